//! The XDP program is the `dns-ebpf` binary target (`src/main.rs`), built for
//! `bpfel-unknown-none`. This empty library lets `dns-agent` declare a build dependency on the
//! crate, so cargo rebuilds the agent (and the object it embeds) when the program changes.
#![no_std]
