//! AES-128-GCM seal and open throughput, ring against aws-lc-rs, on 1 thread
//! and on every CPU at once (`aesb [threads]`).
use std::time::Instant;

fn run<F: Fn(&mut [u8], u64) + Sync>(name: &str, n: usize, threads: usize, f: F) {
    let iters = (1_000_000_000 / n).max(1) as u64;
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![1u8; n + 16];
                for i in 0..iters {
                    f(&mut buf, i);
                }
            });
        }
    });
    let secs = t.elapsed().as_secs_f64();
    let gbps = (iters as usize * n * threads) as f64 / secs / 1e9;
    println!("{name:14} {n:6} B x{threads:2} threads: {gbps:6.2} GB/s ({:.2} GB/s a thread)", gbps / threads as f64);
}

fn nonce(i: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&i.to_be_bytes());
    n
}

fn main() {
    let all = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    for &threads in &[1, all] {
        for &n in &[1400usize, 8900] {
            {
                use ring::aead::*;
                let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7u8; 16]).unwrap());
                run("ring seal", n, threads, |b, i| {
                    let _ = key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce(i)), Aad::from(&[0u8; 20]), &mut b[..n]);
                });
                let mut sealed = vec![1u8; n];
                let tag = key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce(0)), Aad::from(&[0u8; 20]), &mut sealed).unwrap();
                sealed.extend_from_slice(tag.as_ref());
                run("ring open", n, threads, |b, _| {
                    b.copy_from_slice(&sealed);
                    assert!(key.open_in_place(Nonce::assume_unique_for_key(nonce(0)), Aad::from(&[0u8; 20]), b).is_ok());
                });
            }
            {
                use aws_lc_rs::aead::*;
                let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7u8; 16]).unwrap());
                run("aws-lc seal", n, threads, |b, i| {
                    let _ = key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce(i)), Aad::from(&[0u8; 20]), &mut b[..n]);
                });
                let mut sealed = vec![1u8; n];
                let tag = key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce(0)), Aad::from(&[0u8; 20]), &mut sealed).unwrap();
                sealed.extend_from_slice(tag.as_ref());
                run("aws-lc open", n, threads, |b, _| {
                    b.copy_from_slice(&sealed);
                    assert!(key.open_in_place(Nonce::assume_unique_for_key(nonce(0)), Aad::from(&[0u8; 20]), b).is_ok());
                });
            }
        }
    }
}
