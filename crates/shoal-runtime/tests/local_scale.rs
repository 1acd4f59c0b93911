//! The supervisor keeps its target of real processes (`sleep` stands in for
//! a worker): scaled up, scaled down by SIGTERM without replacement, and a
//! crashed one replaced.

use shoal_runtime::local::{LocalCluster, WorkerCommand};
use std::time::{Duration, Instant};

fn sleeper() -> WorkerCommand {
    WorkerCommand {
        program: "sleep".into(),
        args: vec!["60".into()],
        env: Vec::new(),
        reconnect: false,
        scheduler_elsewhere: false,
        obituaries: None,
        zygote: None,
    }
}

fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

#[test]
fn scale_keeps_the_target_and_replaces_only_crashes() {
    let mut cluster = LocalCluster::start(sleeper(), 1).unwrap();
    assert_eq!(cluster.pids().len(), 1);
    cluster.scale(3);
    until("three workers", || cluster.pids().len() == 3);
    assert_eq!(cluster.target(), 3);

    // Down to one: the newest two are asked to retire and not replaced.
    let retired = cluster.scale(1);
    assert_eq!(retired.len(), 2);
    until("one worker", || cluster.pids().len() == 1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(cluster.pids().len(), 1, "a retired worker was replaced");
    assert!(retired.iter().all(|p| !cluster.pids().contains(p)));

    // A crash is replaced (the target stays one).
    let crashed = cluster.pids()[0];
    // SAFETY: kill(2) of our own child process.
    unsafe { libc::kill(crashed as libc::pid_t, libc::SIGKILL) };
    until("a replacement", || {
        let p = cluster.pids();
        p.len() == 1 && p[0] != crashed
    });
    assert_eq!(cluster.target(), 1);
    assert!(cluster.failure().is_none());

    let last = cluster.pids()[0];
    cluster.close();
    until("the last worker to go", || !alive(last));
}

#[test]
fn a_program_that_cannot_start_gives_up_saying_why() {
    let cmd = WorkerCommand {
        program: "/nonexistent/shoal-worker".into(),
        ..sleeper()
    };
    let cluster = LocalCluster::start(cmd, 0).unwrap();
    assert!(cluster.pids().is_empty());
    cluster.scale(2);
    until("the supervisor to give up", || cluster.failure().is_some());
    let why = cluster.failure().unwrap();
    assert!(why.contains("cannot start a worker process"), "{why}");
    assert!(cluster.pids().is_empty());
}
