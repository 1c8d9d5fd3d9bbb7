//! Per-packet QUIC crypto cost, ring against aws-lc-rs, one thread: AES-128-GCM
//! seal and open in place, and the header-protection mask, in ns a packet.
use std::hint::black_box;
use std::time::Instant;

fn time(name: &str, n: usize, iters: u64, mut f: impl FnMut(u64)) {
    for i in 0..iters / 10 { f(i); }
    let t = Instant::now();
    for i in 0..iters { f(i); }
    let ns = t.elapsed().as_nanos() as f64 / iters as f64;
    let gbps = if n > 0 { n as f64 / ns } else { 0.0 };
    println!("{name:22} {n:6} B: {ns:8.1} ns a packet  {gbps:6.2} GB/s");
}
fn nonce(i: u64) -> [u8; 12] { let mut n = [0u8; 12]; n[4..].copy_from_slice(&i.to_be_bytes()); n }

fn main() {
    let iters = 400_000u64;
    for &n in &[1400usize, 8900] {
        {
            use ring::aead::*;
            let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7u8; 16]).unwrap());
            let mut b = vec![1u8; n];
            time("ring seal", n, iters, |i| { let _ = black_box(key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce(i)), Aad::from(&[0u8; 20]), &mut b).unwrap()); });
            let mut sealed = vec![1u8; n];
            let tag = key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce(0)), Aad::from(&[0u8; 20]), &mut sealed).unwrap();
            sealed.extend_from_slice(tag.as_ref());
            let mut b = sealed.clone();
            // open_in_place decrypts: run it on a fresh ciphertext each time would need a copy;
            // a failing tag still does the whole decrypt and GHASH, so time opens of garbage.
            time("ring open (tag fails)", n, iters, |_| { black_box(key.open_in_place(Nonce::assume_unique_for_key(nonce(0)), Aad::from(&[0u8; 20]), &mut b).is_err()); });
        }
        {
            use aws_lc_rs::aead::*;
            let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7u8; 16]).unwrap());
            let mut b = vec![1u8; n];
            time("aws-lc seal", n, iters, |i| { let _ = black_box(key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce(i)), Aad::from(&[0u8; 20]), &mut b).unwrap()); });
            let mut sealed = vec![1u8; n];
            let tag = key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce(0)), Aad::from(&[0u8; 20]), &mut sealed).unwrap();
            sealed.extend_from_slice(tag.as_ref());
            let mut b = sealed.clone();
            time("aws-lc open (tag fails)", n, iters, |_| { black_box(key.open_in_place(Nonce::assume_unique_for_key(nonce(0)), Aad::from(&[0u8; 20]), &mut b).is_err()); });
        }
    }
    let sample = [3u8; 16];
    {
        let k = ring::aead::quic::HeaderProtectionKey::new(&ring::aead::quic::AES_128, &[7u8; 16]).unwrap();
        time("ring header mask", 0, 4 * iters, |_| { black_box(k.new_mask(black_box(&sample)).unwrap()); });
    }
    {
        let k = aws_lc_rs::aead::quic::HeaderProtectionKey::new(&aws_lc_rs::aead::quic::AES_128, &[7u8; 16]).unwrap();
        time("aws-lc header mask", 0, 4 * iters, |_| { black_box(k.new_mask(black_box(&sample)).unwrap()); });
    }
}
