//! What the cluster is doing, printed: `shoal status` (once) and `shoal
//! top` (refreshed in place).

use crate::cluster::CliResult;
use crate::cluster::StatusArgs;
use clap::Args;
use shoal_runtime::{client, runtime};
use std::time::Duration;

#[derive(Args, Debug)]
pub(crate) struct TopArgs {
    #[command(flatten)]
    target: StatusArgs,
    /// Time between refreshes (seconds, or "500ms").
    #[arg(long, default_value = "1", value_parser = shoal_runtime::duration::parse)]
    interval: Duration,
    /// Refresh this many times, then exit (default: until Ctrl-C).
    #[arg(long)]
    iterations: Option<u64>,
}

#[derive(Args, Debug)]
pub(crate) struct TaskArgs {
    /// The task's id (as the dashboard, `shoal job task-ids` and
    /// `Future.id` show it).
    id: u64,
    #[command(flatten)]
    target: StatusArgs,
}

/// `shoal task ID`: the task's state, then its story, the scheduler's
/// transitions and each worker's steps, in time order.
pub(crate) fn run_task(a: TaskArgs) -> CliResult {
    let (address, secret) = a.target.join()?;
    let c = client::connect(runtime(), &address, &secret)
        .map_err(|e| format!("cannot connect to {address}: {e}"))?;
    let json = c.query(&format!("/api/task/{}", a.id), Duration::from_secs(10))?;
    let v: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| format!("bad answer from the scheduler: {e}"))?;
    if let Some(e) = v["error"].as_str() {
        return Err(format!("task {}: {e}", a.id));
    }
    print!("{}", task_text(&v));
    Ok(())
}

/// One line per step, in time order, times from the first step.
fn task_text(v: &serde_json::Value) -> String {
    let s = |x: &serde_json::Value| x.as_str().unwrap_or("-").to_string();
    let mut out = format!(
        "task {} ({}): {}, held by {}\n",
        v["id"],
        s(&v["name"]),
        v["state"].as_str().unwrap_or("forgotten"),
        s(&v["location"])
    );
    let mut steps: Vec<(u64, String, String)> = Vec::new();
    for t in v["story"].as_array().into_iter().flatten() {
        let on = t["worker"]
            .as_str()
            .map(|w| format!(" on {w}"))
            .unwrap_or_default();
        let what = format!(
            "{} -> {}{on} ({})",
            s(&t["from"]),
            s(&t["to"]),
            s(&t["stimulus"])
        );
        steps.push((t["time_us"].as_u64().unwrap_or(0), "scheduler".into(), what));
    }
    if let Some(workers) = v["worker_story"].as_object() {
        for (w, list) in workers {
            for t in list.as_array().into_iter().flatten() {
                let what = match t["phase"].as_str() {
                    Some(p) => format!("{} -> {p} (order {})", s(&t["event"]), t["attempt"]),
                    None => format!("{} (order {})", s(&t["event"]), t["attempt"]),
                };
                steps.push((t["at_us"].as_u64().unwrap_or(0), w.clone(), what));
            }
        }
    }
    steps.sort_by_key(|x| x.0);
    let t0 = steps.first().map_or(0, |x| x.0);
    for (t, at, what) in steps {
        let ms = t.saturating_sub(t0) as f64 / 1000.0;
        out.push_str(&format!("  +{ms:>9.1} ms  {at:<12} {what}\n"));
    }
    for w in v["worker_story_missing"].as_array().into_iter().flatten() {
        out.push_str(&format!("  (no answer from {})\n", s(w)));
    }
    out
}

pub(crate) fn run_status(a: StatusArgs) -> CliResult {
    let (address, secret) = a.join()?;
    let c = client::connect(runtime(), &address, &secret)
        .map_err(|e| format!("cannot connect to {address}: {e}"))?;
    let info = c.cluster_info(Duration::from_secs(10))?;
    print!("{}", status_table(&info));
    Ok(())
}

/// `shoal top`: the cluster's workers and task groups, refreshed in place.
pub(crate) fn run_top(a: TopArgs) -> CliResult {
    let (address, secret) = a.target.join()?;
    let c = client::connect(runtime(), &address, &secret)
        .map_err(|e| format!("cannot connect to {address}: {e}"))?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut prev: Option<(std::time::Instant, u64)> = None;
    let mut n = 0u64;
    loop {
        let info = c.cluster_info(Duration::from_secs(10))?;
        let now = std::time::Instant::now();
        let finished: u64 = info.groups.iter().map(|g| g.finished).sum();
        let rate = prev.map(|(t, f)| finished.saturating_sub(f) as f64 / (now - t).as_secs_f64());
        prev = Some((now, finished));
        let mut screen = String::new();
        if tty {
            screen.push_str("\x1b[H\x1b[2J"); // home, clear
        }
        screen.push_str(&top_screen(&info, rate));
        print!("{screen}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        n += 1;
        if a.iterations.is_some_and(|max| n >= max) {
            return Ok(());
        }
        std::thread::sleep(a.interval);
    }
}

/// One screen of `shoal top`.
pub(crate) fn top_screen(info: &shoal_proto::ClusterInfo, rate: Option<f64>) -> String {
    let mut s = format!(
        "shoal top - {}  workers {}  clients {}  tasks {}  {}\n",
        info.address,
        info.workers.len(),
        info.clients,
        info.tasks,
        match rate {
            Some(r) => format!("{r:.0} tasks/s"),
            None => "- tasks/s".into(),
        }
    );
    if !info.dashboard.is_empty() {
        s.push_str(&format!("dashboard {}\n", info.dashboard));
    }
    s.push_str(&format!(
        "\n{:<24} {:>6} {:>6} {:>10} {:>10} {:>10} {:>7}\n",
        "WORKER", "CPU%", "TASKS", "MEMORY", "MANAGED", "SPILLED", "LIMIT%"
    ));
    for w in &info.workers {
        let m = &w.metrics;
        let pct = if m.limit > 0 {
            format!("{:.0}", m.memory as f64 * 100.0 / m.limit as f64)
        } else {
            "-".into()
        };
        s.push_str(&format!(
            "{:<24} {:>6.0} {:>6} {:>10} {:>10} {:>10} {:>7}{}\n",
            w.name,
            m.cpu,
            w.processing,
            gib(m.memory),
            gib(m.managed),
            gib(m.spilled),
            pct,
            if m.paused { " paused" } else { "" }
        ));
    }
    s.push_str(&format!(
        "\n{:<28} {:>9} {:>9} {:>9} {:>7} {:>10} {:>10}  {}\n",
        "TASK GROUP", "WAITING", "RUNNING", "MEMORY", "ERRED", "DONE", "MEAN", "PROGRESS"
    ));
    for g in info
        .groups
        .iter()
        .filter(|g| g.waiting + g.processing + g.memory + g.erred > 0)
    {
        let done = g.finished.min(g.submitted);
        let frac = if g.submitted > 0 {
            done as f64 / g.submitted as f64
        } else {
            0.0
        };
        let bar_len = (frac * 20.0).round() as usize;
        let mean = if g.finished > 0 {
            format!("{:.2}ms", g.total_us as f64 / g.finished as f64 / 1000.0)
        } else {
            "-".into()
        };
        s.push_str(&format!(
            "{:<28} {:>9} {:>9} {:>9} {:>7} {:>10} {:>10}  [{}{}]\n",
            truncate(&g.name, 28),
            g.waiting,
            g.processing,
            g.memory,
            g.erred,
            format!("{done}/{}", g.submitted),
            mean,
            "#".repeat(bar_len),
            " ".repeat(20 - bar_len)
        ));
    }
    s
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('~');
        t
    }
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

/// The text of `shoal status`.
pub(crate) fn status_table(info: &shoal_proto::ClusterInfo) -> String {
    let mut s = format!(
        "scheduler {}: {} worker(s), {} client(s), {} task(s) known\n",
        info.address,
        info.workers.len(),
        info.clients,
        info.tasks
    );
    s.push_str(&format!(
        "{:<4} {:<22} {:<22} {:>8} {:>7} {:>10} {:>6} {:>10} {:>10} {:>10} {:>6}\n",
        "id",
        "name",
        "address",
        "pid",
        "threads",
        "processing",
        "held",
        "memory",
        "limit",
        "spilled",
        "seen"
    ));
    for w in &info.workers {
        let limit = if w.metrics.limit == 0 {
            "none".to_string()
        } else {
            gib(w.metrics.limit)
        };
        s.push_str(&format!(
            "{:<4} {:<22} {:<22} {:>8} {:>7} {:>10} {:>6} {:>10} {:>10} {:>10} {:>5.1}s{}\n",
            w.id,
            w.name,
            w.address,
            w.pid,
            w.nthreads,
            w.processing,
            w.held,
            gib(w.metrics.memory),
            limit,
            gib(w.metrics.spilled),
            w.last_seen_ms as f64 / 1000.0,
            if w.metrics.paused { " paused" } else { "" }
        ));
    }
    s
}
