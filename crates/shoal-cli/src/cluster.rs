//! `shoal scheduler`, `shoal worker` and `shoal status`: running a cluster
//! across hosts.

use crate::HostInfo;
use clap::Args;
use shoal_runtime::local::{LocalCluster, Obituaries, WorkerCommand};
use shoal_runtime::net::{configure_tls, Address, Secret};
use shoal_runtime::{runtime, scheduler};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub(crate) type CliResult = Result<(), String>;

/// Seconds a `--reconnect` worker process tries to join its lost scheduler
/// again before it exits (and its supervisor starts another).
const RECONNECT_IN_PROCESS: u32 = 600;

/// Certificates for TLS (all three, or none).
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct TlsArgs {
    /// The site's CA certificate (PEM): peers' certificates must chain to it.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// This process's certificate (PEM), issued by the CA for the name `shoal`.
    #[arg(long, requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// This process's private key (PEM).
    #[arg(long, requires_all = ["tls_ca", "tls_cert"])]
    tls_key: Option<PathBuf>,
}

/// Absolute paths of the TLS files, as the scheduler file records them.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
pub(crate) struct TlsFiles {
    ca: String,
    cert: String,
    key: String,
}

impl TlsArgs {
    fn files(&self) -> Result<Option<TlsFiles>, String> {
        let (Some(ca), Some(cert), Some(key)) = (&self.tls_ca, &self.tls_cert, &self.tls_key)
        else {
            return Ok(None);
        };
        let abs = |p: &PathBuf| {
            std::fs::canonicalize(p)
                .map(|p| p.to_string_lossy().into_owned())
                .map_err(|e| format!("{}: {e}", p.display()))
        };
        Ok(Some(TlsFiles {
            ca: abs(ca)?,
            cert: abs(cert)?,
            key: abs(key)?,
        }))
    }
}

impl TlsFiles {
    fn configure(&self) -> CliResult {
        configure_tls(
            Path::new(&self.ca),
            Path::new(&self.cert),
            Path::new(&self.key),
        )
        .map_err(|e| e.to_string())
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("SHOAL_TLS_CA".into(), self.ca.clone()),
            ("SHOAL_TLS_CERT".into(), self.cert.clone()),
            ("SHOAL_TLS_KEY".into(), self.key.clone()),
        ]
    }
}

#[derive(Args, Debug)]
pub(crate) struct CertsArgs {
    /// Directory to write ca.pem, ca-key.pem, cert.pem and key.pem into.
    dir: PathBuf,
    /// Extra names the certificate carries (it always carries `shoal`,
    /// which is what peers check).
    #[arg(long = "name")]
    names: Vec<String>,
}

#[derive(Args, Debug)]
pub(crate) struct SchedulerArgs {
    /// Interface to listen on (0.0.0.0: all; without TLS anyone who can
    /// reach it may try to connect, and only the token keeps them out).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free one).
    #[arg(long, default_value_t = 8786)]
    port: u16,
    /// Write the address and the token file's path here (JSON), for workers
    /// and clients to find (`--scheduler-file`, `Client(scheduler_file=)`).
    #[arg(long)]
    scheduler_file: Option<PathBuf>,
    /// The cluster's token: read from this file, or written to it (mode
    /// 0600) if it does not exist. Default: SHOAL_TOKEN, else a new random
    /// token in SCHEDULER_FILE.token (or ./shoal-PORT.token).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Seconds of silence after which a worker is taken as lost (default 5).
    #[arg(long, value_parser = shoal_runtime::duration::parse)]
    heartbeat_timeout: Option<Duration>,
    /// Where to serve the dashboard (HOST:PORT; another port if taken).
    /// It always asks for the token; a non-loopback HOST exposes it. With
    /// --tls-* it speaks HTTPS with the cluster's certificate.
    #[arg(long, default_value = "127.0.0.1:8787")]
    dashboard_address: String,
    /// Serve no dashboard.
    #[arg(long)]
    no_dashboard: bool,
    /// Listen on (and advertise) this network interface's address, e.g.
    /// `ib0` on a node with several networks (instead of --host).
    #[arg(long, conflicts_with = "host")]
    interface: Option<String>,
    /// Keep jobs (`shoal submit`) and their tasks' outcomes in this file:
    /// a scheduler started again with it (same --port, same token) after a
    /// crash restores them and runs their unfinished tasks again. See
    /// docs/jobs.md for what is and is not restored.
    #[arg(long)]
    journal: Option<PathBuf>,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Args, Debug)]
pub(crate) struct WorkerArgs {
    /// The scheduler's address (tcp://HOST:PORT); or give --scheduler-file.
    address: Option<String>,
    /// The file `shoal scheduler --scheduler-file` wrote.
    #[arg(long)]
    scheduler_file: Option<PathBuf>,
    /// Worker processes to run (1 to 4096).
    #[arg(long, default_value_t = 1, value_parser = count::<4096>)]
    nworkers: usize,
    /// Execution threads per process (1 to 4096).
    #[arg(long, default_value_t = 1, value_parser = count::<4096>)]
    nthreads: usize,
    /// Memory limit per process: bytes, "4GB", a fraction of the host's
    /// memory, "auto" (the host's memory split among the processes), "none".
    #[arg(long, default_value = "auto")]
    memory_limit: String,
    /// Resources each process offers, e.g. "GPU=2,ssd=1".
    #[arg(long)]
    resources: Option<String>,
    /// Name of the processes; `{pid}` becomes each one's process id
    /// (default: HOSTNAME-{pid}).
    #[arg(long)]
    name: Option<String>,
    /// Where to spill to disk.
    #[arg(long)]
    local_directory: Option<PathBuf>,
    /// Modules each process imports right after it starts, before any
    /// task, e.g. "numpy,pandas,dask.dataframe" (a task arriving sooner
    /// waits for them; it would import them itself otherwise).
    #[arg(long)]
    preload: Option<String>,
    /// The cluster's token file (default: the scheduler file's, else SHOAL_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Seconds of silence from the scheduler after which workers exit.
    #[arg(long, value_parser = shoal_runtime::duration::parse)]
    heartbeat_timeout: Option<Duration>,
    /// When the scheduler is lost, join it again when it is back at the
    /// same address instead of giving up: each process keeps running its
    /// tasks and tries once a second for 10 minutes (a scheduler started
    /// again with its --journal adopts those tasks), then exits and a
    /// fresh process keeps trying.
    #[arg(long)]
    reconnect: bool,
    /// Seconds workers get on SIGTERM to hand their data over before
    /// they are killed.
    #[arg(long, default_value = "30", value_parser = shoal_runtime::duration::parse_or_zero)]
    grace: Duration,
    /// Retire gracefully after this long ("55m", "2h", seconds): results
    /// move to other workers, running tasks finish, no new task longer
    /// than what is left (`--time-request`) is placed here. Under Slurm
    /// the default is the job's end time less a tenth of its walltime (5 s
    /// to 2 minutes; $SLURM_JOB_END_TIME, or what `squeue` says is left);
    /// a worker whose lifetime is already over does not join.
    #[arg(long, value_parser = shoal_runtime::duration::parse)]
    lifetime: Option<Duration>,
    /// Each process retires up to this much earlier than --lifetime, at
    /// random, so that they do not all leave at once.
    #[arg(long, value_parser = shoal_runtime::duration::parse)]
    lifetime_stagger: Option<Duration>,
    /// Serve results on (and advertise) this network interface's address,
    /// e.g. `ib0` (default: the one the scheduler is reached through).
    #[arg(long)]
    interface: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
}

/// Time a worker under Slurm keeps to hand its data over before the job's
/// end: a tenth of the job's walltime, from 5 s to 2 minutes (a fixed two
/// minutes left nothing of a short job: its workers retired as they joined).
fn slurm_end_margin(walltime: f64) -> f64 {
    (walltime * 0.1).clamp(5.0, 120.0)
}

/// The Unix time (seconds) workers retire at: `--lifetime` from now, else
/// the Slurm job's end less a margin, else none. An error if that time has
/// come already: a worker that would retire as it joins does not start.
fn lifetime_end(lifetime: Option<Duration>) -> Result<Option<f64>, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    if let Some(l) = lifetime {
        return Ok(Some(now + l.as_secs_f64()));
    }
    let Some(end) = slurm_job_end(now) else {
        return Ok(None);
    };
    // The job's walltime: from its start when Slurm says it (23.02 and
    // later), else what is left now.
    let start = std::env::var("SLURM_JOB_START_TIME")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| *s <= now)
        .unwrap_or(now);
    let margin = slurm_end_margin(end - start);
    let retire = end - margin;
    if retire <= now + 1.0 {
        return Err(format!(
            "the Slurm job ends in {:.0}s, within the {margin:.0}s its workers keep to hand              their data over: not joining (give --lifetime to choose otherwise)",
            end - now
        ));
    }
    Ok(Some(retire))
}

/// The end of the Slurm job this runs in (Unix seconds): Slurm 23.02 and
/// later say it in `$SLURM_JOB_END_TIME`; before, `squeue` tells the time
/// left. None outside a job or with no time limit.
fn slurm_job_end(now: f64) -> Option<f64> {
    if let Some(end) = std::env::var("SLURM_JOB_END_TIME")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
    {
        return (end > now).then_some(end);
    }
    let job = std::env::var("SLURM_JOB_ID").ok()?;
    let out = std::process::Command::new("squeue")
        .args(["-h", "-j", &job, "-o", "%L"])
        .output()
        .ok()?;
    slurm_time_left(String::from_utf8_lossy(&out.stdout).trim()).map(|left| now + left)
}

/// Slurm's time format (`MM:SS`, `HH:MM:SS`, `D-HH:MM:SS`) in seconds;
/// None for `UNLIMITED`, `NOT_SET` and the like.
fn slurm_time_left(s: &str) -> Option<f64> {
    let (days, rest) = match s.split_once('-') {
        Some((d, r)) => (d.parse::<f64>().ok()?, r),
        None => (0.0, s),
    };
    let parts: Vec<f64> = rest
        .split(':')
        .map(|p| p.parse::<f64>().ok())
        .collect::<Option<_>>()?;
    let secs = match parts.as_slice() {
        [m, s] => m * 60.0 + s,
        [h, m, s] => h * 3600.0 + m * 60.0 + s,
        _ => return None,
    };
    Some(days * 86400.0 + secs)
}

#[derive(Args, Debug)]
pub(crate) struct StatusArgs {
    /// The scheduler's address; or give --scheduler-file.
    address: Option<String>,
    /// The file `shoal scheduler --scheduler-file` wrote.
    #[arg(long)]
    scheduler_file: Option<PathBuf>,
    /// The cluster's token file (default: the scheduler file's, else SHOAL_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    tls: TlsArgs,
}

/// What `shoal scheduler --scheduler-file` writes (JSON).
#[derive(serde::Serialize, serde::Deserialize)]
struct SchedulerFile {
    address: String,
    token_file: Option<String>,
    #[serde(default)]
    tls: Option<TlsFiles>,
    pid: u32,
    /// The dashboard's URL, without its token.
    #[serde(default)]
    dashboard: Option<String>,
}

/// How long a command waits for a scheduler file that is not there yet:
/// a batch script starts its scheduler and its workers together, as with
/// Dask's `--scheduler-file`.
const SCHEDULER_FILE_WAIT: Duration = Duration::from_secs(60);

fn read_scheduler_file(path: &Path) -> Result<SchedulerFile, String> {
    let deadline = Instant::now() + SCHEDULER_FILE_WAIT;
    let mut said = false;
    let text = loop {
        match std::fs::read_to_string(path) {
            Ok(text) => break text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && Instant::now() < deadline => {
                if !said {
                    eprintln!(
                        "shoal: waiting for the scheduler file {} (up to {} s)",
                        path.display(),
                        SCHEDULER_FILE_WAIT.as_secs()
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!(
                    "the scheduler file {} did not appear in {} s: is `shoal scheduler \
                     --scheduler-file` running, and is the path one that both of you see?",
                    path.display(),
                    SCHEDULER_FILE_WAIT.as_secs()
                ));
            }
            Err(e) => {
                return Err(format!(
                    "cannot read the scheduler file {}: {e}",
                    path.display()
                ));
            }
        }
    };
    serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a scheduler file: {e}", path.display()))
}

fn read_token(path: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
    Secret::from_token(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The address and secret to join a cluster with: the address argument or
/// the scheduler file's; the token file given, else the scheduler file's,
/// else SHOAL_TOKEN.
pub(crate) fn join_target(
    address: Option<String>,
    scheduler_file: Option<&Path>,
    token_file: Option<&Path>,
    tls: &TlsArgs,
) -> Result<(Address, Secret, Option<TlsFiles>), String> {
    // With neither an address nor a file: $SHOAL_SCHEDULER_FILE.
    let env_file = shoal_runtime::settings::raw("SHOAL_SCHEDULER_FILE").map(PathBuf::from);
    let scheduler_file = match (&address, scheduler_file) {
        (None, None) => env_file.as_deref(),
        (_, f) => f,
    };
    let file = scheduler_file.map(read_scheduler_file).transpose()?;
    let tls = match tls.files()? {
        Some(t) => Some(t),
        None => file.as_ref().and_then(|f| f.tls.clone()),
    };
    if let Some(t) = &tls {
        t.configure()?;
    }
    let address = address
        .or_else(|| file.as_ref().map(|f| f.address.clone()))
        .ok_or("give the scheduler's address or --scheduler-file (or set SHOAL_SCHEDULER_FILE)")?;
    let address = Address::parse(&address)?;
    let token_file = token_file
        .map(Path::to_path_buf)
        .or_else(|| file.and_then(|f| f.token_file.map(PathBuf::from)));
    let secret = match token_file {
        Some(p) => read_token(&p)?,
        None => match shoal_runtime::settings::raw("SHOAL_TOKEN") {
            Some(t) => Secret::from_token(&t).map_err(|e| e.to_string())?,
            None => {
                return Err(
                    "the cluster's token is needed: --token-file, --scheduler-file \
                            (whose token file is used), or SHOAL_TOKEN"
                        .into(),
                )
            }
        },
    };
    Ok((address, secret, tls))
}

fn set_heartbeat_timeout(timeout: Option<Duration>) -> CliResult {
    if let Some(d) = timeout {
        if d < Duration::from_millis(500) {
            return Err(format!(
                "--heartbeat-timeout must be at least 0.5 seconds, not {}",
                d.as_secs_f64()
            ));
        }
        // SAFETY: called before any thread (runtime, workers) is started;
        // worker processes inherit it.
        unsafe { std::env::set_var("SHOAL_HEARTBEAT_TIMEOUT", d.as_secs_f64().to_string()) };
    }
    Ok(())
}

/// A count from the command line: 1 to `MAX` (more processes or threads
/// than that is a typo, not a plan, and would exhaust the host first).
pub(crate) fn count<const MAX: usize>(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=MAX).contains(&n) => Ok(n),
        _ => Err(format!("{text:?} is not a whole number from 1 to {MAX}")),
    }
}

/// Writes `text` to a new file only this user can read.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Dask's forms of a dashboard address: `:PORT` (or a bare `PORT`) means
/// every interface, that port.
fn dashboard_address(s: &str) -> String {
    if let Some(port) = s.strip_prefix(':') {
        format!("0.0.0.0:{port}")
    } else if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        format!("0.0.0.0:{s}")
    } else {
        s.to_string()
    }
}

/// `tcp://0.0.0.0:P` (or `[::]`) as peers on other hosts reach it:
/// `tcp://HOSTNAME:P`. Other addresses are unchanged.
fn advertised(address: &str) -> String {
    for any in ["0.0.0.0:", "[::]:"] {
        if let Some((scheme, rest)) = address.split_once("://") {
            if let Some(port) = rest.strip_prefix(any) {
                return format!("{scheme}://{}:{port}", hostname());
            }
        }
    }
    address.to_string()
}

/// Where `shoal scheduler` notes which token file serves which address, so
/// that `Client("HOST:PORT")` by the same user finds the token.
fn cluster_registry() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    Some(PathBuf::from(home).join(".shoal").join("clusters"))
}

/// Records `address` -> `token_file` in the registry (best effort); returns
/// the entry's path, to remove at exit.
fn register_cluster(address: &str, token_file: &Path) -> Option<PathBuf> {
    let dir = cluster_registry()?;
    std::fs::create_dir_all(&dir).ok()?;
    let name: String = address
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let path = dir.join(format!("{name}.json"));
    let entry = serde_json::json!({
        "address": address,
        "token_file": token_file.to_string_lossy(),
        "pid": std::process::id(),
    });
    std::fs::write(&path, entry.to_string()).ok()?;
    Some(path)
}

pub(crate) fn run_scheduler(mut a: SchedulerArgs) -> CliResult {
    // Workers joining and leaving are news, as in Dask's scheduler log.
    shoal_runtime::init_logging_with("warn,shoal_runtime::scheduler=info");
    a.dashboard_address = dashboard_address(&a.dashboard_address);
    if let Some(name) = &a.interface {
        a.host = shoal_runtime::net::interface_ip(name)
            .map_err(|e| format!("--interface: {e}"))?
            .to_string();
    }
    set_heartbeat_timeout(a.heartbeat_timeout)?;
    let default_token_file = || match &a.scheduler_file {
        Some(f) => {
            let mut p = f.clone().into_os_string();
            p.push(".token");
            PathBuf::from(p)
        }
        None => PathBuf::from(format!("shoal-{}.token", a.port)),
    };
    let (secret, token_file) = match (&a.token_file, shoal_runtime::settings::raw("SHOAL_TOKEN")) {
        (Some(p), _) if p.exists() => (read_token(p)?, Some(p.clone())),
        (None, Some(t)) => (Secret::from_token(&t).map_err(|e| e.to_string())?, None),
        (None, _) if default_token_file().exists() => {
            // A restart with the same --scheduler-file keeps the cluster's
            // token, so `--reconnect` workers (and clients) can rejoin.
            let p = default_token_file();
            let meta = std::fs::metadata(&p)
                .map_err(|e| format!("cannot read the token file {}: {e}", p.display()))?;
            if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o077 != 0 {
                return Err(format!(
                    "the token file {} can be read by other users: remove it (a new token \
                     is made) or `chmod 600` it",
                    p.display()
                ));
            }
            eprintln!(
                "shoal scheduler: reusing the cluster token in {}",
                p.display()
            );
            (read_token(&p)?, Some(p))
        }
        (p, _) => {
            let p = p.clone().unwrap_or_else(default_token_file);
            let s = Secret::random();
            write_private(&p, &s.token())
                .map_err(|e| format!("cannot write the token file {}: {e}", p.display()))?;
            (s, Some(p))
        }
    };
    let tls = a.tls.files()?;
    if let Some(t) = &tls {
        t.configure()?;
    }
    if !is_loopback(&a.host) && tls.is_none() {
        eprintln!(
            "shoal: WARNING: listening on {} without TLS: peers must prove the token, but \
             what travels is not encrypted, and the handshake proves the token, not who \
             is at the other end: anyone on the network path can read the traffic, and \
             can relay a genuine peer's handshake to take over its connection (pickles are \
             code). Use TLS (`shoal certs`, --tls-*) beyond a trusted network",
            a.host
        );
    }
    let hp = format!("{}:{}", a.host, a.port);
    let addr = if tls.is_some() {
        Address::Tls(hp)
    } else {
        Address::Tcp(hp)
    };
    let dashboard_host = a
        .dashboard_address
        .rsplit_once(':')
        .map_or("", |(h, _)| h)
        .trim_matches(['[', ']']);
    if !a.no_dashboard && !is_loopback(dashboard_host) && a.tls.files()?.is_none() {
        eprintln!(
            "shoal: WARNING: the dashboard on {} asks for its token, but serves plain HTTP: \
             on an untrusted network reach it through an SSH tunnel instead",
            a.dashboard_address
        );
    }
    let rt = runtime();
    let dashboard_token = secret.dashboard_token();
    let dashboard = (!a.no_dashboard).then_some(a.dashboard_address.as_str());
    let handle = rt
        .block_on(scheduler::start_with_journal(
            &addr,
            secret,
            dashboard,
            a.journal.as_deref(),
        ))
        .map_err(|e| format!("cannot start the scheduler at {addr}: {e}"))?;
    // Listening on every interface: what others use to reach it is this
    // host's name (as Dask advertises), not 0.0.0.0.
    let address = advertised(&handle.address.to_string());
    println!("shoal scheduler at {address}");
    if let Some(url) = &handle.dashboard {
        println!("dashboard: {url}?token={dashboard_token}");
    }
    let token_path = token_file
        .as_ref()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()));
    if let Some(p) = &token_path {
        println!("token file: {}", p.display());
    }
    let registered = token_path
        .as_deref()
        .and_then(|p| register_cluster(&address, p));
    if let Some(f) = &a.scheduler_file {
        let info = SchedulerFile {
            address: address.clone(),
            token_file: token_path.map(|p| p.to_string_lossy().into_owned()),
            tls,
            pid: std::process::id(),
            dashboard: handle.dashboard.clone(),
        };
        // Written whole, then renamed: a reader never sees half a file.
        let tmp = f.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::to_string_pretty(&info).expect("serializable"),
        )
        .and_then(|()| std::fs::rename(&tmp, f))
        .map_err(|e| format!("cannot write the scheduler file {}: {e}", f.display()))?;
        println!("scheduler file: {}", f.display());
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let why = rt.block_on(async {
        tokio::select! {
            s = wait_for_signal() => Ok(s),
            why = handle.crashed() => Err(why),
        }
    });
    let why = match why {
        Ok(s) => s,
        Err(crash) => {
            // Already stopped: every connection is closed.
            if let Some(f) = &a.scheduler_file {
                let _ = std::fs::remove_file(f);
            }
            if let Some(r) = &registered {
                let _ = std::fs::remove_file(r);
            }
            return Err(format!("shoal scheduler crashed: {crash}"));
        }
    };
    eprintln!("shoal scheduler: {why}; asking workers to exit");
    handle.shutdown_workers();
    std::thread::sleep(Duration::from_millis(300));
    handle.stop();
    if let Some(f) = &a.scheduler_file {
        let _ = std::fs::remove_file(f);
    }
    if let Some(r) = &registered {
        let _ = std::fs::remove_file(r);
    }
    Ok(())
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handlers install");
    let mut int = signal(SignalKind::interrupt()).expect("signal handlers install");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

pub(crate) fn run_worker(a: WorkerArgs, host: &HostInfo) -> CliResult {
    shoal_runtime::init_logging();
    set_heartbeat_timeout(a.heartbeat_timeout)?;
    if a.nworkers == 0 || a.nthreads == 0 {
        return Err("--nworkers and --nthreads must be at least 1".into());
    }
    let (address, secret, tls) = join_target(
        a.address.clone(),
        a.scheduler_file.as_deref(),
        a.token_file.as_deref(),
        &a.tls,
    )?;
    let program = host
        .executable
        .clone()
        .ok_or("`shoal worker` must run from the Python package (the `shoal` script)")?;
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| format!("{}-{{pid}}", hostname()));
    let memory_limit = if a.memory_limit == "auto" {
        // The host's memory split among this command's processes.
        format!("{}", 1.0 / a.nworkers as f64)
    } else {
        a.memory_limit.clone()
    };
    let mut args = vec![
        "-m".to_string(),
        "shoal._worker".into(),
        "--nthreads".into(),
        a.nthreads.to_string(),
        "--name".into(),
        name.clone(),
        "--memory-limit".into(),
        memory_limit,
    ];
    if let Some(r) = &a.resources {
        args.extend(["--resources".into(), r.clone()]);
    }
    if let Some(d) = &a.local_directory {
        args.extend(["--local-directory".into(), d.to_string_lossy().into_owned()]);
    }
    if let Some(m) = &a.preload {
        args.extend(["--preload".into(), m.clone()]);
    }
    args.push(address.to_string());
    if let Some(check) = host.check_worker_args {
        // A bad --memory-limit or --resources is one clear error here, not
        // every process dying of it as it starts.
        check(&args[2..])?;
    }
    // The token travels in the environment, never on a command line.
    let mut env = vec![("SHOAL_TOKEN".to_string(), secret.token())];
    env.extend(tls.iter().flat_map(TlsFiles::env));
    if a.reconnect {
        // Each process keeps its running tasks across a scheduler restart
        // for this long; past it, it exits and a fresh one is started.
        env.push(("SHOAL_RECONNECT".into(), RECONNECT_IN_PROCESS.to_string()));
    }
    if let Some(name) = &a.interface {
        // Checked here: a wrong name is one clear error, not n dead workers.
        shoal_runtime::net::interface_ip(name).map_err(|e| format!("--interface: {e}"))?;
        env.push(("SHOAL_INTERFACE".into(), name.clone()));
    }
    if let Some(end) = lifetime_end(a.lifetime)? {
        // An absolute time: replacements started later leave with the rest.
        env.push(("SHOAL_LIFETIME_END".into(), format!("{end:.3}")));
        let stagger = a.lifetime_stagger.map_or(0.0, |d| d.as_secs_f64());
        env.push(("SHOAL_LIFETIME_STAGGER".into(), format!("{stagger:.3}")));
    }
    if let Some(pkg) = host
        .package_path
        .as_deref()
        .and_then(|p| Path::new(p).parent())
    {
        let mut path = pkg.to_string_lossy().into_owned();
        if let Ok(old) = std::env::var("PYTHONPATH") {
            path = format!("{path}:{old}");
        }
        env.push(("PYTHONPATH".into(), path));
    }
    // The supervisor's own messages name it by its own process id, not by
    // the template its workers fill in with theirs.
    let name = name.replace("{pid}", &std::process::id().to_string());
    let cmd = WorkerCommand {
        program,
        args,
        env,
        reconnect: a.reconnect,
        scheduler_elsewhere: true,
        obituaries: Some(Obituaries {
            scheduler: address.clone(),
            secret: secret.clone(),
        }),
        zygote: None,
    };
    let mut workers = LocalCluster::start(cmd, a.nworkers)
        .map_err(|e| format!("cannot start worker processes: {e}"))?;
    println!(
        "shoal worker {name}: {} process(es) of {} thread(s) joining {address}",
        a.nworkers, a.nthreads
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let why = runtime().block_on(async {
        tokio::select! {
            s = wait_for_signal() => s,
            () = async {
                while !workers.pids().is_empty() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            } => "every worker process exited (or gave up)",
        }
    });
    eprintln!("shoal worker {name}: {why}; stopping");
    // SIGTERM: each process asks to retire, hands the results still needed
    // to other workers, and is stopped by the scheduler (a second signal,
    // or the grace period running out, kills them).
    workers.terminate();
    let deadline = std::time::Instant::now() + a.grace;
    while !workers.pids().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let failure = workers.failure();
    workers.close();
    match failure {
        Some(why) => Err(format!("shoal worker {name}: {why}")),
        None => Ok(()),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "worker".into())
}

impl StatusArgs {
    /// The scheduler these options name, and its secret.
    pub(crate) fn join(self) -> Result<(Address, Secret), String> {
        let (address, secret, _) = join_target(
            self.address,
            self.scheduler_file.as_deref(),
            self.token_file.as_deref(),
            &self.tls,
        )?;
        Ok((address, secret))
    }
}

#[derive(Args, Debug)]
pub(crate) struct NoopArgs {
    #[command(flatten)]
    target: StatusArgs,
    /// Light workers to run.
    #[arg(long, default_value_t = 100)]
    count: usize,
}

/// `shoal noop-workers`: light workers for scale tests (see
/// `shoal_runtime::noop`); exits when the scheduler tells them to.
pub(crate) fn run_noop_workers(a: NoopArgs) -> CliResult {
    let (address, secret) = a.target.join()?;
    runtime()
        .block_on(shoal_runtime::noop::run_many(address, secret, a.count))
        .map_err(|e| format!("light workers: {e}"))
}

/// `shoal certs DIR`: a self-signed CA for a site and one certificate it
/// issues for the name `shoal` (give every process of the cluster these
/// files; a site may issue one certificate per host instead).
pub(crate) fn run_certs(a: CertsArgs) -> CliResult {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let err = |e: rcgen::Error| format!("cannot make certificates: {e}");
    std::fs::create_dir_all(&a.dir).map_err(|e| format!("{}: {e}", a.dir.display()))?;
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.distinguished_name
        .push(DnType::CommonName, "shoal cluster CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca, ca_key);
    let mut names = vec![shoal_runtime::net::TLS_NAME.to_string(), "localhost".into()];
    names.extend(a.names.iter().cloned());
    let key = KeyPair::generate().map_err(err)?;
    let mut params = CertificateParams::new(names).map_err(err)?;
    params
        .distinguished_name
        .push(DnType::CommonName, shoal_runtime::net::TLS_NAME);
    let cert = params.signed_by(&key, &issuer).map_err(err)?;
    let write = |name: &str, text: String, private: bool| -> CliResult {
        let p = a.dir.join(name);
        let _ = std::fs::remove_file(&p);
        let r = if private {
            write_private(&p, &text)
        } else {
            std::fs::write(&p, text)
        };
        r.map_err(|e| format!("cannot write {}: {e}", p.display()))
    };
    write("ca.pem", ca_cert.pem(), false)?;
    write("ca-key.pem", ca_key_pem, true)?;
    write("cert.pem", cert.pem(), false)?;
    write("key.pem", key.serialize_pem(), true)?;
    println!(
        "wrote {0}/ca.pem, {0}/cert.pem, {0}/key.pem (and {0}/ca-key.pem: keep it safe)\n\
         use: --tls-ca {0}/ca.pem --tls-cert {0}/cert.pem --tls-key {0}/key.pem",
        a.dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod address_tests {
    use super::*;

    #[test]
    fn dask_dashboard_forms_mean_every_interface() {
        assert_eq!(dashboard_address(":22222"), "0.0.0.0:22222");
        assert_eq!(dashboard_address("8787"), "0.0.0.0:8787");
        assert_eq!(dashboard_address("127.0.0.1:8787"), "127.0.0.1:8787");
    }

    #[test]
    fn the_margin_scales_with_the_walltime() {
        assert_eq!(slurm_end_margin(60.0), 6.0);
        assert_eq!(slurm_end_margin(10.0), 5.0);
        assert_eq!(slurm_end_margin(600.0), 60.0);
        assert_eq!(slurm_end_margin(86_400.0), 120.0);
    }

    #[test]
    fn slurm_time_formats() {
        assert_eq!(slurm_time_left("5:00"), Some(300.0));
        assert_eq!(slurm_time_left("1:02:03"), Some(3723.0));
        assert_eq!(slurm_time_left("2-00:00:01"), Some(172_801.0));
        assert_eq!(slurm_time_left("UNLIMITED"), None);
        assert_eq!(slurm_time_left(""), None);
    }

    #[test]
    fn every_interface_is_advertised_by_host_name() {
        let h = hostname();
        assert_eq!(advertised("tcp://0.0.0.0:8786"), format!("tcp://{h}:8786"));
        assert_eq!(advertised("tls://[::]:1"), format!("tls://{h}:1"));
        assert_eq!(advertised("tcp://10.0.0.5:8786"), "tcp://10.0.0.5:8786");
    }
}
