//! xdns XDP fast path.
//!
//! Reads like the protocol, a module per stage: `layers` (ethernet → IPv4/IPv6 → UDP),
//! `question` (DNS header → question → OPT), `lookup` (the answer maps the agent fills, see
//! `dns-common`: the zone, then the cache of upstream answers), `reply` (checksum from parts,
//! then the query rewritten in place into the response and sent back out of the interface it
//! came in on with `XDP_TX`), `ttl` (a cached answer's TTLs counted down), `autopath` (is this
//! a search-path expansion of the asking pod's namespace?), and for queries to an intercepted
//! address the kernel does not answer, `steer` (to the agent while it answers).
//! `packet`, `csum`, `addrs` and `maps` serve them all. `egress` is the second program: a tc
//! egress classifier that gives the replies to steered queries their address back.
//!
//! Rules (DESIGN.md): fail open. Anything not fully understood — and anything whose answer is
//! not in the maps — goes up the stack untouched (`XDP_PASS`), where the agent answers it. The
//! program never drops, except a packet it has already started to rewrite and then cannot
//! finish (never seen; counted as `ERROR_WRITE`), because passing a half-written query up could
//! get it a wrong answer.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

mod addrs;
mod autopath;
mod csum;
mod egress;
mod layers;
mod lookup;
mod maps;
mod packet;
mod question;
mod reply;
mod steer;
mod trace;
mod ttl;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use dns_common::{CONFIG_SYNCED, counter};

use crate::maps::{CONFIG, SCRATCH};

/// How one packet ends: the verdict, and the counter that records why.
pub struct Outcome {
    pub action: u32,
    pub counter: u32,
}

pub const fn pass(counter: u32) -> Outcome {
    Outcome {
        action: xdp_action::XDP_PASS,
        counter,
    }
}

#[xdp]
pub fn xdns_xdp(ctx: XdpContext) -> u32 {
    let mut intercepted = false;
    let mut outcome = match handle(&ctx, &mut intercepted) {
        Ok(o) | Err(o) => o,
    };
    let scratch = SCRATCH.get_ptr_mut(0);
    // A cached answer's TTLs, written last from what the stages left in scratch memory: the
    // verifier checks the loop once rather than once for every way to an answer.
    if outcome.action == xdp_action::XDP_TX
        && matches!(
            outcome.counter,
            counter::ANSWERED_CACHED | counter::ANSWERED_AUTOPATH
        )
        && let Some(s) = scratch
        // SAFETY: per-CPU scratch, not shared with any other program run.
        && !ttl::count_down(&ctx, unsafe { &*s })
    {
        // The reply is written but for its TTLs: a half-written reply must not leave.
        outcome = Outcome {
            action: xdp_action::XDP_DROP,
            counter: counter::ERROR_WRITE,
        };
    }
    // Before the key's tail is cleaned: the event carries the name. Not for the traffic that is
    // no DNS query of ours (most of a pod's packets): it costs them not even the flag's lookup.
    if outcome.counter != counter::PASS_NOT_DNS && trace::wanted(&ctx) {
        let s = scratch.map_or(core::ptr::null(), |s| s.cast_const());
        trace::emit(ctx.ctx, outcome.action, outcome.counter, s);
    }
    if let Some(scratch) = scratch {
        // SAFETY: per-CPU scratch, not shared with any other program run.
        unsafe { (*scratch).clean_tail() };
    }
    maps::count(outcome.counter);
    if intercepted && outcome.action == xdp_action::XDP_PASS {
        // Steered to the agent, or left to the Service: decided last, from the packet alone,
        // so that the verifier checks it once rather than once for every way the pipeline
        // can pass.
        steer::steer_or_leave(&ctx);
    }
    outcome.action
}

/// The pipeline. `Err` is an early end (usually a pass up), `Ok` a reply sent. `intercepted`:
/// the query was to an intercepted address, and a pass must be steered or left.
#[inline(always)]
fn handle(ctx: &XdpContext, intercepted: &mut bool) -> Result<Outcome, Outcome> {
    let config = CONFIG.get_ptr(0).ok_or(pass(counter::PASS_NOT_DNS))?;
    // SAFETY: array map values live as long as the map.
    let config = unsafe { &*config };
    let layers = layers::parse(ctx, config)?;
    // Past the grace period the maps no longer follow the cluster: answer nothing from them,
    // steer nothing.
    if !steer::liveness(config).in_grace {
        return Err(pass(counter::PASS_AGENT_DOWN));
    }
    *intercepted = layers.intercepted;
    answer(ctx, &layers, config)
}

/// DNS header → question → lookup → reply.
#[inline(always)]
fn answer(
    ctx: &XdpContext,
    layers: &layers::Layers,
    config: &dns_common::ZoneConfig,
) -> Result<Outcome, Outcome> {
    let header = question::header(ctx, layers)?;
    if config.flags & CONFIG_SYNCED == 0 {
        return Err(pass(counter::PASS_NOT_SYNCED));
    }
    let scratch = SCRATCH
        .get_ptr_mut(0)
        .ok_or(pass(counter::PASS_MALFORMED))?;
    // SAFETY: per-CPU scratch, not shared with any other program run.
    let scratch = unsafe { &mut *scratch };
    let query = question::question(ctx, layers, &header, scratch)?;
    let answer = lookup::answer(ctx, scratch, config, &query)?;
    reply::send(ctx, layers, config, scratch, &query, &answer)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
