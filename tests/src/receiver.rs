//! A SIEM stand-in for `tcp://` outputs: an NDJSON receiver on a loopback port that the test
//! starts when it wants (to be "down" until then), keeping every line in arrival order.
use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    sync::{Arc, Mutex},
};

pub struct LineReceiver {
    lines: Arc<Mutex<Vec<String>>>,
}

impl LineReceiver {
    pub fn start(port: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the receiver");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        std::thread::spawn(move || {
            // One connection at a time: the sink reconnects only after its connection broke.
            for conn in listener.incoming() {
                let Ok(conn) = conn else { break };
                for line in BufReader::new(conn).lines() {
                    let Ok(line) = line else { break };
                    l.lock().unwrap().push(line);
                }
            }
        });
        Self { lines }
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

/// A loopback port nobody listens on (yet).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
