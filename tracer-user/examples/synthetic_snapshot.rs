//! Writes the benchmarks' synthetic cluster (10k pods, 2k policies) as a kubectl List, for
//! measuring `droptrace run --k8s-snapshot` memory: `cargo run --example synthetic_snapshot
//! -- FILE`.
#[path = "../benches/synthetic.rs"]
mod synthetic;

fn main() -> std::io::Result<()> {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: synthetic_snapshot FILE");
        std::process::exit(2);
    };
    std::fs::write(path, serde_json::to_vec(&synthetic::list())?)
}
