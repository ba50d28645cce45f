//! The floor scenario: what the kernel alone charges for what a gateway does
//! per delivery, one small write on its own loopback TCP socket (and what a
//! client pays to read it), with no herald and no WebSocket library. One
//! thread writes one frame to each of N sockets in turn, as a broadcast's
//! fan-out does, then reads them all back. Comparing a gateway's CPU per
//! delivery with this floor says how much of it is herald's own.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::cli::FloorArgs;

pub async fn run(args: &FloorArgs) -> anyhow::Result<()> {
    let (sockets, bytes, rounds) = (args.sockets, args.bytes, args.rounds.max(1));
    eprintln!("floor: {sockets} loopback socket pairs, {bytes} B per write, {rounds} rounds");
    let (writes, reads) = tokio::task::spawn_blocking(move || measure(sockets, bytes, rounds)).await??;
    let write_us = median(writes) * 1e6;
    let read_us = median(reads) * 1e6;
    println!("\n### floor: one {bytes} B write and read on loopback TCP, no herald; median of {rounds} rounds\n");
    println!(
        "| sockets | write µs | read µs |{}",
        args.project.iter().map(|n| format!(" {n}-way fan-out, writes only |")).collect::<String>()
    );
    println!("| ---: | ---: | ---: |{}", " ---: |".repeat(args.project.len()));
    let projections: String =
        args.project.iter().map(|n| format!(" {:.1} ms |", write_us * *n as f64 / 1000.0)).collect();
    println!("| {sockets} | {write_us:.2} | {read_us:.2} |{projections}");
    Ok(())
}

/// Seconds per write and per read, one figure per round.
fn measure(sockets: usize, bytes: usize, rounds: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
    let addr = listener.local_addr()?;
    let mut servers = Vec::with_capacity(sockets);
    let mut clients = Vec::with_capacity(sockets);
    for _ in 0..sockets {
        let client = TcpStream::connect(addr).context("connecting (too many sockets for the file limit?)")?;
        let (server, _) = listener.accept()?;
        server.set_nodelay(true)?;
        client.set_read_timeout(Some(Duration::from_secs(5)))?;
        clients.push(client);
        servers.push(server);
    }
    let frame = vec![0x81u8; bytes];
    let mut buf = vec![0u8; bytes.max(4096)];
    let (mut writes, mut reads) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for _ in 0..rounds {
        let started = Instant::now();
        for server in &mut servers {
            server.write_all(&frame)?;
        }
        writes.push(started.elapsed().as_secs_f64() / sockets as f64);
        let started = Instant::now();
        for client in &mut clients {
            client.read_exact(&mut buf[..bytes])?;
        }
        reads.push(started.elapsed().as_secs_f64() / sockets as f64);
    }
    Ok((writes, reads))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
