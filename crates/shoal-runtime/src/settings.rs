//! Every `SHOAL_*` environment variable in one table: its default and what
//! it means. Rust and Python read them through here ([`raw`],
//! `_core.setting`), so a variable cannot be read without being listed;
//! `shoal info` prints the effective values and `docs/configuration.md`
//! has the table.
//!
//! A user sets defaults once in a settings file (TOML; see [`file_path`]):
//! `heartbeat-timeout = 10` sets what `SHOAL_HEARTBEAT_TIMEOUT` sets. The
//! environment overrides the file, and arguments override both.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

/// Who sets a variable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The user (or a launcher) sets it to change Shoal's behaviour.
    User,
    /// Shoal sets it for the processes it starts (workers, command tasks).
    Shoal,
    /// Only the project's own tests read it.
    Tests,
}

/// One variable.
#[derive(Clone, Copy, Debug)]
pub struct Var {
    /// Its name.
    pub name: &'static str,
    /// The value that applies when it is unset ("" for none).
    pub default: &'static str,
    /// What it does.
    pub meaning: &'static str,
    /// Who sets it.
    pub origin: Origin,
}

const fn user(name: &'static str, default: &'static str, meaning: &'static str) -> Var {
    Var {
        name,
        default,
        meaning,
        origin: Origin::User,
    }
}

const fn shoal(name: &'static str, meaning: &'static str) -> Var {
    Var {
        name,
        default: "",
        meaning,
        origin: Origin::Shoal,
    }
}

/// Every variable, by origin, then by name.
pub const VARS: &[Var] = &[
    user("SHOAL_CONFIG", "", "the settings file (TOML); default: $XDG_CONFIG_HOME/shoal/shoal.toml, else ~/.config/shoal/shoal.toml"),
    user("SHOAL_DASHBOARD_LINK", "", "template of the dashboard link clients show, e.g. `{JUPYTERHUB_SERVICE_PREFIX}proxy/{port}/` (fields: scheme, host, port, environment variables)"),
    user("SHOAL_DASK_FUSE", "1", "0: each task of a Dask graph stays a Shoal task (by default a partition's pipeline of operations runs as one)"),
    user("SHOAL_DASK_ORDER", "", "`dask`: Dask graphs are prioritised by dask.order instead of the core's own order"),
    user("SHOAL_HEARTBEAT_TIMEOUT", "5", "seconds a peer may stay silent before it is taken as lost (at least 0.5)"),
    user("SHOAL_HOST_KEY", "", "names this host for the data plane (processes with the same key share memory); default: hostname and boot id"),
    user("SHOAL_INTERFACE", "", "network interface whose address a worker's data server listens on (`shoal worker --interface`)"),
    user("SHOAL_LIFETIME_END", "", "Unix time at which a worker retires (set by `shoal worker --lifetime` and from a batch job's end)"),
    user("SHOAL_LIFETIME_STAGGER", "0", "seconds over which a job's workers spread their retirement"),
    user("SHOAL_LOG", "warn", "log filter of Shoal's own messages (tracing's syntax: `info`, `shoal_runtime=debug`)"),
    user("SHOAL_MALLOC_TRIM", "1", "0: a worker keeps the C heap memory its tasks freed (by default it returns it to the system once idle for a second, and under memory pressure)"),
    user("SHOAL_PLACE_PARTNERS", "1", "0: a task with no inputs on workers goes to the least loaded worker (by default beside the other inputs of its consumers: a transpose's chunk beside its partner)"),
    user("SHOAL_PROFILE_INTERVAL", "0.02", "seconds between the profiler's samples of running tasks; 0 turns it off"),
    user("SHOAL_RECONNECT", "", "seconds a client or worker that lost its scheduler keeps trying to join it again (off when unset)"),
    user("SHOAL_RECOVERY_WAIT", "3", "seconds a restarted scheduler holds restored tasks for their workers and clients to return"),
    user("SHOAL_SCHEDULER_ADDRESS", "", "Client() with no address joins this scheduler instead of starting a cluster (set by shoal.mpi and `shoal run`)"),
    user("SHOAL_SCHEDULER_FILE", "", "the scheduler file `shoal worker`, `shoal status` and `shoal submit` use when none is given"),
    user("SHOAL_SHM_ALLOC", "1", "0: NumPy arrays made in tasks stay in private memory instead of shared memory"),
    user("SHOAL_SHM_DIR", "/dev/shm", "directory of shared-memory segments (a tmpfs; `huge=within_size` is faster)"),
    user("SHOAL_SHM_HUGE", "1", "0: shared memory is not collapsed into huge pages"),
    user("SHOAL_SPILL_COMPRESSION", "none", "`lz4`: results spilled to disk are compressed"),
    user("SHOAL_STOP_GRACE", "5", "seconds a stopped task has before it is killed (a command) or its worker restarted (Python)"),
    user("SHOAL_TLS_CA", "", "the site CA's certificate (PEM), with SHOAL_TLS_CERT and SHOAL_TLS_KEY: connect over TLS"),
    user("SHOAL_TLS_CERT", "", "this process's certificate (PEM), issued by the site CA"),
    user("SHOAL_TLS_KEY", "", "this process's private key (PEM)"),
    user("SHOAL_TOKEN", "", "the cluster's token, when no token file is given"),
    user("SHOAL_WORKER_START", "auto", "how a local cluster starts its worker processes: `fork` (from a copy of the client made before its scheduler starts: no imports, the libraries' memory shared), `spawn` (anew), `auto` (fork for the first cluster or client of a process in which no other thread runs, no GPU library is loaded and under 1 GiB is held)"),
    shoal("SHOAL_CPUS", "in a command task: the CPUs it holds"),
    shoal("SHOAL_ENTRY", "in a command task of a `--each-line` or `--from-json` job: its entry"),
    shoal("SHOAL_JOB_ID", "in a command task: its job's id"),
    shoal("SHOAL_PARENT_PID", "in a scheduler or worker that Shoal's Python side started (`shoal.mpi`'s ranks, job-queue clusters' schedulers): the process id of the process that started it; it ends when that process does"),
    shoal("SHOAL_SLOT_FD", "in a worker process: the descriptor of the page where it writes which task each thread runs, for its supervisor"),
    shoal("SHOAL_SUPERVISOR", "in a worker process: the id of the supervisor that reports its death"),
    shoal("SHOAL_TASK_ID", "in a command task: its id in its job (the array index)"),
    Var { name: "SHOAL_FUZZ_SECS", default: "", meaning: "seconds each fuzz test runs", origin: Origin::Tests },
    Var { name: "SHOAL_FUZZ_SEED", default: "", meaning: "the fuzz tests' seed", origin: Origin::Tests },
    Var { name: "SHOAL_SIM_SEEDS", default: "", meaning: "how many seeds the core's simulation test runs", origin: Origin::Tests },
];

/// The entry of `name`; None for a variable not in the table.
pub fn var(name: &str) -> Option<&'static Var> {
    VARS.iter().find(|v| v.name == name)
}

/// The value of `name` when it is set and not empty: from the
/// environment, else from the settings file. A variable missing from
/// [`VARS`] is a bug (debug builds panic; release builds read it).
pub fn raw(name: &str) -> Option<String> {
    debug_assert!(
        var(name).is_some(),
        "{name} is not in shoal_runtime::settings::VARS"
    );
    lookup(name).map(|(v, _)| v)
}

/// The value of `name` and where it came from: the environment, else the
/// settings file; None where neither sets it.
fn lookup(name: &str) -> Option<(String, Source)> {
    from_env(name)
        .map(|v| (v, Source::Environment))
        .or_else(|| from_file(name).map(|v| (v.to_string(), Source::File)))
}

fn from_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Where a setting's value comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The process's environment (`SHOAL_*`).
    Environment,
    /// The settings file.
    File,
    /// Neither: the table's default.
    Default,
}

/// The settings file: `SHOAL_CONFIG`, else `shoal/shoal.toml` under
/// `XDG_CONFIG_HOME`, else under `~/.config`. None without a home.
pub fn file_path() -> Option<PathBuf> {
    if let Some(p) = from_env("SHOAL_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let base = from_env("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| from_env("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("shoal").join("shoal.toml"))
}

/// The key of `name` in the settings file: `SHOAL_HEARTBEAT_TIMEOUT` is
/// `heartbeat-timeout`.
pub fn file_key(name: &str) -> String {
    name.trim_start_matches("SHOAL_")
        .to_ascii_lowercase()
        .replace('_', "-")
}

/// A settings file's values by variable name.
type FileValues = HashMap<&'static str, String>;

/// Why a settings file cannot be used; each says which file and what to fix.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SettingsError {
    /// It does not parse.
    #[error("{path}: not valid TOML: {detail}")]
    NotToml {
        /// The file.
        path: String,
        /// The parser's account.
        detail: String,
    },
    /// A key that names no user setting.
    #[error("{path}: `{key}` is not a Shoal setting; the settings are: {known}")]
    UnknownKey {
        /// The file.
        path: String,
        /// The key as written.
        key: String,
        /// Every key the file may set, comma-separated.
        known: String,
    },
    /// A value that is not a string, a number or a boolean.
    #[error("{path}: `{key}` must be a string, a number or true/false, not a {kind}")]
    BadValue {
        /// The file.
        path: String,
        /// The key as written.
        key: String,
        /// The TOML type given.
        kind: &'static str,
    },
    /// It exists (or was named by `SHOAL_CONFIG`) but cannot be read.
    #[error("cannot read the settings file {path}: {detail}")]
    Unreadable {
        /// The file.
        path: String,
        /// The system's account.
        detail: String,
    },
}

/// Reads and checks a settings file: every key a user setting, every value
/// a string, a number or a boolean (`true` is "1", `false` is "0").
pub fn parse_file(path: &std::path::Path, text: &str) -> Result<FileValues, SettingsError> {
    let shown = || path.display().to_string();
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| SettingsError::NotToml {
            path: shown(),
            detail: e.to_string(),
        })?;
    let mut out = FileValues::new();
    for (key, value) in table {
        let name = format!("SHOAL_{}", key.to_ascii_uppercase().replace('-', "_"));
        let Some(v) = var(&name).filter(|v| v.origin == Origin::User && v.name != "SHOAL_CONFIG")
        else {
            let known: Vec<String> = VARS
                .iter()
                .filter(|v| v.origin == Origin::User && v.name != "SHOAL_CONFIG")
                .map(|v| file_key(v.name))
                .collect();
            return Err(SettingsError::UnknownKey {
                path: shown(),
                key,
                known: known.join(", "),
            });
        };
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => if b { "1" } else { "0" }.to_string(),
            other => {
                return Err(SettingsError::BadValue {
                    path: shown(),
                    key,
                    kind: other.type_str(),
                })
            }
        };
        out.insert(v.name, text);
    }
    Ok(out)
}

/// The settings file's values, read once per process: an empty table where
/// there is no file, the error where it cannot be used.
fn file_values() -> &'static Result<(Option<PathBuf>, FileValues), SettingsError> {
    static FILE: OnceLock<Result<(Option<PathBuf>, FileValues), SettingsError>> = OnceLock::new();
    FILE.get_or_init(|| {
        let Some(path) = file_path() else {
            return Ok((None, FileValues::new()));
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => parse_file(&path, &text).map(|v| (Some(path), v)),
            // Only a file someone named must exist.
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && from_env("SHOAL_CONFIG").is_none() =>
            {
                Ok((None, FileValues::new()))
            }
            Err(e) => Err(SettingsError::Unreadable {
                path: path.display().to_string(),
                detail: e.to_string(),
            }),
        }
    })
}

fn from_file(name: &str) -> Option<&'static str> {
    match file_values() {
        Ok((_, values)) => values.get(name).map(String::as_str),
        Err(_) => None, // said by `check` where a process starts
    }
}

/// The settings file in use (None: there is none), or why it cannot be
/// used. Entry points (the CLI, `Client()`) call it first, so a bad file is
/// an error there instead of being ignored.
pub fn check() -> Result<Option<PathBuf>, SettingsError> {
    file_values()
        .as_ref()
        .map(|(p, _)| p.clone())
        .map_err(Clone::clone)
}

/// The value of `name`, or its default.
pub fn value(name: &str) -> String {
    raw(name).unwrap_or_else(|| var(name).map_or("", |v| v.default).to_string())
}

/// `name` as seconds (a number, at least `min`); its default where it is
/// unset or not such a number.
pub fn seconds(name: &str, min: f64) -> Option<Duration> {
    let parse = |s: &str| {
        s.trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= min && *v <= crate::duration::MAX.as_secs_f64())
    };
    raw(name)
        .as_deref()
        .and_then(parse)
        .or_else(|| var(name).and_then(|v| parse(v.default)))
        .map(Duration::from_secs_f64)
}

/// `name` is set to one of the words that turn a feature off.
pub fn is_off(name: &str) -> bool {
    raw(name).is_some_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "0" | "off" | "no" | "false"
        )
    })
}

/// Every user setting with its effective value and where it came from
/// (`shoal info`).
pub fn effective() -> Vec<(&'static Var, String, Source)> {
    VARS.iter()
        .filter(|v| v.origin == Origin::User)
        .map(|v| {
            let (x, source) =
                lookup(v.name).unwrap_or_else(|| (v.default.to_string(), Source::Default));
            (v, x, source)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_each_name_once_and_every_read_is_listed() {
        let mut names: Vec<_> = VARS.iter().map(|v| v.name).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(n, names.len(), "a variable is listed twice");
        // Every `SHOAL_*` name in the sources is in the table.
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
        let mut stack = vec![
            std::path::PathBuf::from(root).join("crates"),
            std::path::PathBuf::from(root).join("python"),
        ];
        let mut missing = std::collections::BTreeSet::new();
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    if !p.ends_with("target") {
                        stack.push(p);
                    }
                    continue;
                }
                if !matches!(p.extension().and_then(|x| x.to_str()), Some("rs" | "py")) {
                    continue;
                }
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                for (i, _) in text.match_indices("SHOAL_") {
                    let name: String = text[i..]
                        .chars()
                        .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                        .collect();
                    // `SHOAL_TLS_*` and the like name a family; a prefix is not a variable.
                    if !name.ends_with('_') && var(&name).is_none() && name != "SHOAL_REPORT" {
                        missing.insert(format!("{name} ({})", p.display()));
                    }
                }
            }
        }
        assert!(missing.is_empty(), "not in settings::VARS: {missing:?}");
    }

    #[test]
    fn the_configuration_page_lists_every_variable() {
        let page = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/configuration.md");
        let text = std::fs::read_to_string(page).unwrap();
        let missing: Vec<_> = VARS
            .iter()
            .filter(|v| !text.contains(&format!("| `{}` |", v.name)))
            .map(|v| v.name)
            .collect();
        assert!(
            missing.is_empty(),
            "not in docs/configuration.md: {missing:?}"
        );
    }

    #[test]
    fn a_settings_file_names_settings_by_key_and_says_what_is_wrong() {
        let p = std::path::Path::new("/x/shoal.toml");
        let v = parse_file(
            p,
            "heartbeat-timeout = 10\nlog = \"info\"\nshm_huge = false\nprofile-interval = 0.5\n",
        )
        .unwrap();
        assert_eq!(v["SHOAL_HEARTBEAT_TIMEOUT"], "10");
        assert_eq!(v["SHOAL_LOG"], "info");
        assert_eq!(v["SHOAL_SHM_HUGE"], "0");
        assert_eq!(v["SHOAL_PROFILE_INTERVAL"], "0.5");
        let e = parse_file(p, "heartbeat-timout = 10")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`heartbeat-timout` is not a Shoal setting"),
            "{e}"
        );
        assert!(e.contains("heartbeat-timeout"), "{e}");
        // Set by Shoal for its children, not by users.
        assert!(parse_file(p, "task-id = 3").is_err());
        let e = parse_file(p, "log = [1, 2]").unwrap_err().to_string();
        assert!(
            e.contains("must be a string, a number or true/false"),
            "{e}"
        );
        let e = parse_file(p, "log = ").unwrap_err().to_string();
        assert!(e.starts_with("/x/shoal.toml: not valid TOML"), "{e}");
        assert_eq!(file_key("SHOAL_RECOVERY_WAIT"), "recovery-wait");
    }

    #[test]
    fn seconds_fall_back_to_the_default() {
        assert_eq!(
            seconds("SHOAL_STOP_GRACE", 0.0),
            Some(Duration::from_secs(5))
        );
        assert_eq!(seconds("SHOAL_RECONNECT", 0.0), None);
    }
}
