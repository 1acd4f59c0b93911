//! Addresses: `unix://`, `tcp://`, `tls://`, `mem://`, and a network interface's IP.

use super::*;

/// Where a scheduler or a worker's data server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// `unix:///path/to/socket`
    Unix(PathBuf),
    /// `tcp://host:port`
    Tcp(String),
    /// `tls://host:port`: TCP with mutual TLS (see [`configure_tls`]).
    Tls(String),
    /// `mem://name`: a pipe inside this process (tests; see `net::memory`).
    Memory(String),
}

/// Why an address could not be parsed (each names the address given).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// `mem://` with no name.
    #[error("address {0:?} has no name")]
    NoName(String),
    /// `unix://` with no path.
    #[error("address {0:?} has no socket path")]
    NoPath(String),
    /// Neither a known scheme nor `HOST:PORT`.
    #[error(
        "cannot parse address {0:?}: expected tcp://HOST:PORT, tls://HOST:PORT or unix:///PATH"
    )]
    Unknown(String),
}

impl From<AddressError> for String {
    fn from(e: AddressError) -> String {
        e.to_string()
    }
}

impl Address {
    /// Parses `unix://PATH`, `tcp://HOST:PORT` or `tls://HOST:PORT` (a bare
    /// `HOST:PORT` means TCP).
    pub fn parse(s: &str) -> Result<Address, AddressError> {
        if let Some(name) = s.strip_prefix("mem://") {
            if name.is_empty() {
                return Err(AddressError::NoName(s.to_string()));
            }
            return Ok(Address::Memory(name.to_string()));
        }
        if let Some(p) = s.strip_prefix("unix://") {
            if p.is_empty() {
                return Err(AddressError::NoPath(s.to_string()));
            }
            return Ok(Address::Unix(PathBuf::from(p)));
        }
        let (tls, hp) = match s.strip_prefix("tls://") {
            Some(hp) => (true, hp),
            None => (false, s.strip_prefix("tcp://").unwrap_or(s)),
        };
        match hp.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => Ok(if tls {
                Address::Tls(hp.to_string())
            } else {
                Address::Tcp(hp.to_string())
            }),
            _ => Err(AddressError::Unknown(s.to_string())),
        }
    }

    /// The same kind of address (transport) at `host_port`.
    pub fn with_host_port(&self, host_port: String) -> Address {
        match self {
            Address::Tls(_) => Address::Tls(host_port),
            _ => Address::Tcp(host_port),
        }
    }
}

/// The IPv4 address of network interface `name` (`ib0`, `eth0`): where a
/// multi-homed node listens and what it advertises (`--interface`).
pub fn interface_ip(name: &str) -> io::Result<std::net::IpAddr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = None;
    let mut names = Vec::new();
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        // SAFETY: ifa_name is a NUL-terminated string while the list lives.
        let n = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        if !ifa.ifa_addr.is_null()
        // SAFETY: ifa_addr points to a sockaddr while the list lives.
        && i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == libc::AF_INET
        {
            if n == name && found.is_none() {
                // SAFETY: an AF_INET sockaddr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                found = Some(std::net::IpAddr::V4(std::net::Ipv4Addr::from(
                    u32::from_be(sin.sin_addr.s_addr),
                )));
            }
            names.push(n.into_owned());
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(list) };
    found.ok_or_else(|| {
        names.sort();
        names.dedup();
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "no network interface {name:?} with an IPv4 address here; this host has: {}",
                names.join(", ")
            ),
        )
    })
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix://{}", p.display()),
            Address::Tcp(hp) => write!(f, "tcp://{hp}"),
            Address::Tls(hp) => write!(f, "tls://{hp}"),
            Address::Memory(name) => write!(f, "mem://{name}"),
        }
    }
}
