//! Address lists of the zone configuration (listen and intercepted addresses), compared in
//! place: a short scan is cheaper than a map lookup per packet. Unused slots are zero, and the
//! first zero slot ends the list.

/// Is `a` in `list`?
#[inline(always)]
pub fn has_v4<const N: usize>(list: &[[u8; 4]; N], a: [u8; 4]) -> bool {
    let a = u32::from_ne_bytes(a);
    let mut i = 0;
    while i < N {
        let x = u32::from_ne_bytes(list[i]);
        if x == 0 {
            return false;
        }
        if x == a {
            return true;
        }
        i += 1;
    }
    false
}

/// Is `a` in `list`?
#[inline(always)]
pub fn has_v6<const N: usize>(list: &[[u8; 16]; N], a: &[u8; 16]) -> bool {
    let (a0, a1) = halves(a);
    let mut i = 0;
    while i < N {
        let (x0, x1) = halves(&list[i]);
        if x0 == 0 && x1 == 0 {
            return false;
        }
        if x0 == a0 && x1 == a1 {
            return true;
        }
        i += 1;
    }
    false
}

#[inline(always)]
fn halves(a: &[u8; 16]) -> (u64, u64) {
    (
        u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
        u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
    )
}
