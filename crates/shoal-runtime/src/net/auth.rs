//! The cluster's secret and the handshake that proves it, both ways.

use super::*;

/// The cluster's shared secret. Every connection proves knowledge of it
/// (HMAC-SHA256 challenge-response, both ways); it never travels.
#[derive(Clone)]
pub struct Secret(Arc<Vec<u8>>);

impl Secret {
    /// A secret from its text form (a token, as in a token file; surrounding
    /// whitespace is ignored). Empty tokens are refused.
    pub fn from_token(token: &str) -> io::Result<Secret> {
        let t = token.trim();
        if t.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the cluster token is empty",
            ));
        }
        Ok(Secret(Arc::new(t.as_bytes().to_vec())))
    }

    /// A fresh random token (256 bits, hex).
    pub fn random() -> Secret {
        let token: String = nonce().iter().map(|b| format!("{b:02x}")).collect();
        Secret(Arc::new(token.into_bytes()))
    }

    /// The token's text, to hand to processes that join the cluster.
    pub fn token(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }

    fn hmac(&self, label: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("any key length");
        m.update(label);
        for p in parts {
            m.update(&(p.len() as u64).to_le_bytes());
            m.update(p);
        }
        m
    }

    /// The dashboard's access token: derived from the cluster's, so anyone
    /// with the cluster token can open it, while the link does not reveal
    /// the cluster token itself.
    pub fn dashboard_token(&self) -> String {
        self.mac(b"shoal-dashboard", &[])[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    pub(super) fn mac(&self, label: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        self.hmac(label, parts).finalize().into_bytes().into()
    }

    fn verify(&self, label: &[u8], parts: &[&[u8]], mac: &[u8; 32]) -> bool {
        self.hmac(label, parts).verify_slice(mac).is_ok() // constant time
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

pub(crate) fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    getrandom::fill(&mut n).expect("the OS has no random source");
    n
}

pub(crate) const SERVER: &[u8] = b"shoal server proof v1";
pub(crate) const CLIENT: &[u8] = b"shoal peer proof v1";

/// Connects and introduces ourselves; returns the connection and the id the
/// scheduler assigned. Both sides prove they know `secret`; refusals come
/// back as errors with the server's reason.
pub async fn handshake(addr: &Address, role: Role, secret: &Secret) -> io::Result<(Conn, u32)> {
    let fut = async {
        let (mut conn, _) = connect(addr).await?;
        let hello = Hello::new(role, nonce());
        send(&mut conn, &hello).await?;
        let closed = || {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("{addr} closed the connection during the handshake"),
            )
        };
        let refused = |reason: String| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{addr} refused the connection: {reason}"),
            )
        };
        let server_nonce = match recv::<Welcome>(&mut conn).await?.ok_or_else(closed)? {
            Welcome::Challenge { nonce, proof } => {
                if !secret.verify(SERVER, &[&hello.nonce, &nonce], &proof) {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "{addr} does not know this cluster's token: wrong token \
                             (check --token-file / SHOAL_TOKEN) or not this cluster"
                        ),
                    ));
                }
                nonce
            }
            Welcome::Rejected { reason } => return Err(refused(reason)),
            Welcome::Accepted { .. } => {
                return Err(refused("it skipped authentication".into()));
            }
        };
        let mac = secret.mac(CLIENT, &[&server_nonce, &hello.nonce, &encode(&hello)]);
        send(&mut conn, &Proof { mac }).await?;
        match recv::<Welcome>(&mut conn).await?.ok_or_else(closed)? {
            Welcome::Accepted { id } => {
                authenticated(&mut conn);
                Ok((conn, id))
            }
            Welcome::Rejected { reason } => Err(refused(reason)),
            Welcome::Challenge { .. } => Err(refused("a second challenge".into())),
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("handshake with {addr} timed out"),
            )
        })?
}

/// Server side of the handshake: reads the peer's hello, challenges it and
/// checks its proof. `Ok(hello)` for a peer that knows `secret`; the caller
/// then sends `Welcome::Accepted`. Anything else is logged, refused with a
/// reason where the peer spoke the protocol, and `Err`.
pub(crate) async fn accept_handshake(
    conn: &mut Conn,
    secret: &Secret,
    peer: &str,
) -> Result<Hello, ()> {
    // The caller bounds the whole exchange by HANDSHAKE_TIMEOUT.
    let hello = match recv::<Hello>(conn).await {
        Ok(Some(h)) => h,
        Ok(None) => return Err(()),
        Err(e) => {
            tracing::warn!("dropping {peer}: malformed handshake ({e})");
            return Err(());
        }
    };
    if let Err(why) = hello.validate() {
        tracing::warn!("refusing {peer}: {why}");
        let reason = why.to_string();
        let _ = send(conn, &Welcome::Rejected { reason }).await;
        return Err(());
    }
    let my_nonce = nonce();
    let proof = secret.mac(SERVER, &[&hello.nonce, &my_nonce]);
    if send(
        conn,
        &Welcome::Challenge {
            nonce: my_nonce,
            proof,
        },
    )
    .await
    .is_err()
    {
        return Err(());
    }
    let proof = recv::<Proof>(conn).await;
    let ok = match &proof {
        Ok(Some(p)) => secret.verify(CLIENT, &[&my_nonce, &hello.nonce, &encode(&hello)], &p.mac),
        _ => false,
    };
    if !ok {
        // A peer with the wrong token finds out first (our proof does not
        // check) and leaves without one; so does an aborted fetch.
        let what = match proof {
            Ok(Some(_)) => "wrong cluster token",
            _ => "left before proving it has the cluster token: a wrong token, or it gave up",
        };
        tracing::warn!("refusing {peer}: authentication failed ({what})");
        let reason = "authentication failed: this peer does not have the cluster's token".into();
        let _ = send(conn, &Welcome::Rejected { reason }).await;
        return Err(());
    }
    Ok(hello)
}
