fn main() {
    let obj = include_bytes!(concat!(env!("OUT_DIR"), "/dns-ebpf"));
    let mut v = obj.to_vec();
    let mut ebpf = aya::EbpfLoader::new()
        .verifier_log_level(aya::VerifierLogLevel::VERBOSE | aya::VerifierLogLevel::STATS)
        .load(&mut v)
        .expect("load");
    let prog: &mut aya::programs::Xdp = ebpf.program_mut("xdns_xdp").unwrap().try_into().unwrap();
    match prog.load() {
        Ok(()) => println!("verified OK"),
        Err(e) => {
            println!("{e}");
            if let aya::programs::ProgramError::LoadError { verifier_log, .. } = &e {
                let s = verifier_log.to_string();
                let lines: Vec<_> = s.lines().collect();
                for l in &lines[lines.len().saturating_sub(60)..] {
                    println!("{l}");
                }
            }
        }
    }
}
