use std::time::Instant;
fn main() {
    let mut buf = vec![0u8; 4 << 20];
    let src = vec![1u8; 4 << 20];
    rayon::scope(|_| {}); // start the pool
    for parts in [1usize, 2, 8] {
        for (name, pool) in [("thread::scope", false), ("rayon::scope", true)] {
            let t = Instant::now();
            for _ in 0..300 {
                let per = buf.len() / parts;
                if pool {
                    rayon::scope(|s| {
                        for (d, c) in buf.chunks_mut(per).zip(src.chunks(per)) {
                            s.spawn(move |_| d.copy_from_slice(c));
                        }
                    });
                } else {
                    std::thread::scope(|s| {
                        for (d, c) in buf.chunks_mut(per).zip(src.chunks(per)) {
                            s.spawn(move || d.copy_from_slice(c));
                        }
                    });
                }
            }
            println!("{name} parts {parts}: {:.1} us per 4 MiB frame", t.elapsed().as_secs_f64() * 1e6 / 300.0);
        }
    }
}
