//! Why a `droptrace` command ended, and its exit code: 0 done, 1 a failure while running (the
//! kernel refused a program, an API server that cannot be listed, a read that failed), 2 bad
//! input or missing privileges, found before anything is attached. `main` prints
//! [`Error::report`] (`droptrace: ` and one line) and exits with [`Error::exit_code`].
use crate::{
    commands::explain::ExplainError,
    enrich::identity::IdentityError,
    enrich::k8s::LiveError,
    output::{OutputError, OutputSummary},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag, a file or a combination of them that cannot work (2).
    #[error("{0}")]
    Input(String),
    /// Not root, a capability missing, or bpf() refused (2).
    #[error("{0}")]
    Privileges(String),
    /// An `--output`, TLS file, spool directory or `--metrics` address (2).
    #[error(transparent)]
    Output(#[from] OutputError),
    /// A kubeconfig that cannot be read or used (2: connecting only reads it).
    #[error(transparent)]
    Kubeconfig(#[from] LiveError),
    /// A bad cluster snapshot (2), or an API server that cannot be listed (1).
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// `explain`: bad input (2), or a cluster that cannot be read (1).
    #[error(transparent)]
    Explain(#[from] ExplainError),
    /// `check`: a check that tracing needs failed (1; a missing privilege is
    /// [`Error::Privileges`]).
    #[error("cannot trace: {check}: {detail}")]
    CannotTrace { check: String, detail: String },
    /// No async runtime (1).
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// Tracing or replaying failed once started (1): the cause chain on one line. `outputs`:
    /// what the outputs delivered until then, reported on the next line.
    #[error("{error:#}")]
    Failed {
        error: anyhow::Error,
        outputs: Option<OutputSummary>,
    },
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Input(_) | Error::Privileges(_) | Error::Output(_) | Error::Kubeconfig(_) => 2,
            Error::Identity(IdentityError::Input(_)) => 2,
            Error::Identity(IdentityError::Api(_)) => 1,
            Error::Explain(e) => e.exit_code(),
            Error::CannotTrace { .. } | Error::Runtime(_) | Error::Failed { .. } => 1,
        }
    }

    /// What `droptrace` prints on stderr: `droptrace: ` and the message (then the outputs'
    /// summary line, if the outputs ran).
    pub fn report(&self) -> String {
        match self {
            Error::Failed {
                outputs: Some(o), ..
            } => format!("droptrace: {self}\n{}", o.line()),
            _ => format!("droptrace: {self}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_and_privileges_exit_2_failures_exit_1() {
        let cases = [
            (Error::Input("--ports: x".into()), 2),
            (Error::Privileges("missing capability CAP_BPF".into()), 2),
            (
                Error::Output(OutputError::Spec("--output ftp://x".into())),
                2,
            ),
            (Error::Identity(IdentityError::Input("snap.json".into())), 2),
            (Error::Identity(IdentityError::Api("down".into())), 1),
            (Error::Explain(ExplainError::Input("--from".into())), 2),
            (
                Error::CannotTrace {
                    check: "btf".into(),
                    detail: "no /sys/kernel/btf/vmlinux".into(),
                },
                1,
            ),
            (Error::Runtime(std::io::Error::other("no fds")), 1),
            (
                Error::Failed {
                    error: anyhow::anyhow!("ring buffer").context("attach"),
                    outputs: None,
                },
                1,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(e.exit_code(), code, "{e}");
            let report = e.report();
            assert!(report.starts_with("droptrace: "), "{report}");
            assert_eq!(report.lines().count(), 1, "{report}");
        }
    }

    #[test]
    fn a_failure_after_the_outputs_ran_reports_them_on_the_next_line() {
        let e = Error::Failed {
            error: anyhow::anyhow!("Input/output error").context("reading --input"),
            outputs: Some(OutputSummary::default()),
        };
        assert_eq!(
            e.report(),
            "droptrace: reading --input: Input/output error\ndroptrace: outputs: "
        );
    }
}
