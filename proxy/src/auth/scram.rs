//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it, both ends: the proxy is the
//! server to its client, checking the client's proof against the role's stored verifier, and
//! the client to PostgreSQL with the ClientKey that proof revealed (PgBouncer's SCRAM pass-
//! through): the password itself is never known to the proxy.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const MECHANISM: &str = "SCRAM-SHA-256";
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 18;

type Key = [u8; KEY_LEN];

fn hmac(key: &[u8], parts: &[&[u8]]) -> Key {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn sha256(data: &[u8]) -> Key {
    Sha256::digest(data).into()
}

fn xor(a: &Key, b: &Key) -> Key {
    std::array::from_fn(|i| a[i] ^ b[i])
}

/// Hi() of RFC 5802: PBKDF2 with HMAC-SHA-256 and one block of output.
pub fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> Key {
    let mut u = hmac(password, &[salt, &1u32.to_be_bytes()]);
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &[&u]);
        out = xor(&out, &u);
    }
    out
}

/// A role's stored SCRAM verifier: `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Key,
    pub server_key: Key,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier(..)")
    }
}

impl Verifier {
    pub fn parse(s: &str) -> Option<Verifier> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let key = |k: &str| -> Option<Key> { B64.decode(k).ok()?.try_into().ok() };
        Some(Verifier {
            iterations: iterations.parse().ok().filter(|&i| i > 0)?,
            salt: B64.decode(salt).ok()?,
            stored_key: key(stored)?,
            server_key: key(server)?,
        })
    }

    /// The verifier of `password` (tests, and the auth role's own login).
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> (Verifier, Key) {
        let salted = salted_password(password.as_bytes(), salt, iterations);
        let client_key = hmac(&salted, &[b"Client Key"]);
        let v = Verifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&client_key),
            server_key: hmac(&salted, &[b"Server Key"]),
        };
        (v, client_key)
    }
}

/// What the client's first message binds the session to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Binding {
    /// "n": the client does not support channel binding.
    No,
    /// "y": it does, but thinks the server does not.
    NotOffered,
    /// "p=tls-server-end-point".
    EndPoint,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("unsupported SCRAM channel binding type")]
    UnsupportedBinding,
    #[error("SCRAM channel binding negotiation error")]
    BindingNegotiation,
    #[error("SCRAM channel binding check failed")]
    BindingMismatch,
    #[error("invalid SCRAM nonce")]
    Nonce,
    /// The proof does not match: a wrong password.
    #[error("password authentication failed")]
    Proof,
    #[error("the server's SCRAM signature is wrong")]
    ServerSignature,
}

use ScramError::Malformed;

/// The client-first-message (`gs2-header client-first-message-bare`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientFirst {
    pub binding: Binding,
    /// The gs2 header as sent, which the client-final's `c=` repeats.
    pub gs2_header: String,
    pub bare: String,
    pub nonce: String,
}

impl ClientFirst {
    pub fn parse(msg: &str) -> Result<ClientFirst, ScramError> {
        let (binding, rest) = match msg.split_once(',') {
            Some(("n", r)) => (Binding::No, r),
            Some(("y", r)) => (Binding::NotOffered, r),
            Some(("p=tls-server-end-point", r)) => (Binding::EndPoint, r),
            Some((p, _)) if p.starts_with("p=") => return Err(ScramError::UnsupportedBinding),
            _ => return Err(Malformed("gs2 header")),
        };
        // PostgreSQL refuses an authzid, as does the proxy.
        let bare = rest.strip_prefix(',').ok_or(Malformed("authzid"))?;
        let gs2_header = msg[..msg.len() - bare.len()].to_string();
        let mut attrs = bare.split(',');
        let user = attrs.next().ok_or(Malformed("username"))?;
        if user.starts_with("m=") {
            return Err(Malformed("mandatory extension"));
        }
        user.strip_prefix("n=").ok_or(Malformed("username"))?;
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b','))
            .ok_or(Malformed("nonce"))?;
        Ok(ClientFirst {
            binding,
            gs2_header,
            bare: bare.to_string(),
            nonce: nonce.to_string(),
        })
    }
}

/// The client-final-message's parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientFinal {
    pub channel_binding: Vec<u8>,
    pub nonce: String,
    pub without_proof: String,
    pub proof: Key,
}

impl ClientFinal {
    pub fn parse(msg: &str) -> Result<ClientFinal, ScramError> {
        let (without_proof, proof) = msg.rsplit_once(",p=").ok_or(Malformed("proof"))?;
        let mut attrs = without_proof.split(',');
        let cb = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(Malformed("channel binding"))?;
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(Malformed("nonce"))?;
        Ok(ClientFinal {
            channel_binding: B64.decode(cb).map_err(|_| Malformed("channel binding"))?,
            nonce: nonce.to_string(),
            without_proof: without_proof.to_string(),
            proof: B64
                .decode(proof)
                .ok()
                .and_then(|p| p.try_into().ok())
                .ok_or(Malformed("proof"))?,
        })
    }
}

fn nonce() -> String {
    use rand::RngCore;
    let mut raw = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    B64.encode(raw)
}

/// The proxy as the SCRAM server, one exchange.
pub struct Server {
    verifier: Verifier,
    first: ClientFirst,
    server_first: String,
    nonce: String,
}

impl Server {
    /// Answers a client-first-message. `plus`: the client chose SCRAM-SHA-256-PLUS.
    /// `offered_plus`: the proxy offered it (TLS terminated).
    pub fn start(
        verifier: Verifier,
        client_first: &str,
        plus: bool,
        offered_plus: bool,
    ) -> Result<Server, ScramError> {
        let first = ClientFirst::parse(client_first)?;
        match (&first.binding, plus) {
            (Binding::EndPoint, true) => {}
            (Binding::EndPoint, false) | (_, true) => return Err(ScramError::BindingNegotiation),
            // The client supports binding and we offered it: a downgrade, refused.
            (Binding::NotOffered, false) if offered_plus => {
                return Err(ScramError::BindingNegotiation)
            }
            _ => {}
        }
        let nonce = format!("{}{}", first.nonce, self::nonce());
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        Ok(Server {
            verifier,
            first,
            server_first,
            nonce,
        })
    }

    pub fn server_first(&self) -> &str {
        &self.server_first
    }

    /// Checks the client-final-message: the ClientKey it proves, and the server-final
    /// message to send. `end_point`: the hash of the proxy's certificate, for binding.
    pub fn finish(
        &self,
        client_final: &str,
        end_point: Option<&[u8]>,
    ) -> Result<(Key, String), ScramError> {
        let fin = ClientFinal::parse(client_final)?;
        let mut want_cb = self.first.gs2_header.as_bytes().to_vec();
        if self.first.binding == Binding::EndPoint {
            want_cb.extend(end_point.ok_or(ScramError::BindingMismatch)?);
        }
        if !bool::from(fin.channel_binding.ct_eq(&want_cb)) {
            return Err(ScramError::BindingMismatch);
        }
        if fin.nonce != self.nonce {
            return Err(ScramError::Nonce);
        }
        let auth_message = format!(
            "{},{},{}",
            self.first.bare, self.server_first, fin.without_proof
        );
        let signature = hmac(&self.verifier.stored_key, &[auth_message.as_bytes()]);
        let client_key = xor(&fin.proof, &signature);
        if !bool::from(sha256(&client_key).ct_eq(&self.verifier.stored_key)) {
            return Err(ScramError::Proof);
        }
        let server_signature = hmac(&self.verifier.server_key, &[auth_message.as_bytes()]);
        Ok((client_key, format!("v={}", B64.encode(server_signature))))
    }
}

/// What the proxy proves itself with as a SCRAM client: a client's ClientKey and the
/// verifier's ServerKey (a pass-through), or a password (its own auth role).
pub enum ClientSecret {
    Keys { client_key: Key, server_key: Key },
    Password(String),
}

/// The proxy as the SCRAM client of a server.
pub struct Client {
    secret: ClientSecret,
    bare: String,
    nonce: String,
    /// The AuthMessage and the ServerKey, once the server's first message is answered.
    sent: Option<(String, Key)>,
}

impl Client {
    pub fn new(secret: ClientSecret) -> Client {
        let nonce = nonce();
        Client {
            secret,
            // PostgreSQL takes the user from the startup packet and ignores this one.
            bare: format!("n=,r={nonce}"),
            nonce,
            sent: None,
        }
    }

    /// The client-first-message: no channel binding ("n": the proxy authenticates itself to
    /// the server with the client's key; its own TLS to the server is not bound).
    pub fn client_first(&self) -> String {
        format!("n,,{}", self.bare)
    }

    /// Answers the server-first-message with the client-final-message.
    pub fn client_final(&mut self, server_first: &str) -> Result<String, ScramError> {
        let mut attrs = server_first.split(',');
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(Malformed("server nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramError::Nonce);
        }
        let salt = attrs
            .next()
            .and_then(|a| a.strip_prefix("s="))
            .and_then(|s| B64.decode(s).ok())
            .ok_or(Malformed("salt"))?;
        let iterations: u32 = attrs
            .next()
            .and_then(|a| a.strip_prefix("i="))
            .and_then(|i| i.parse().ok())
            .filter(|&i| i > 0)
            .ok_or(Malformed("iterations"))?;
        let (client_key, server_key) = match &self.secret {
            ClientSecret::Keys {
                client_key,
                server_key,
            } => (*client_key, *server_key),
            ClientSecret::Password(p) => {
                let (v, client_key) = Verifier::from_password(p, &salt, iterations);
                (client_key, v.server_key)
            }
        };
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.bare);
        let stored_key = sha256(&client_key);
        let signature = hmac(&stored_key, &[auth_message.as_bytes()]);
        let proof = xor(&client_key, &signature);
        self.sent = Some((auth_message, server_key));
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server-final-message.
    pub fn verify(&self, server_final: &str) -> Result<(), ScramError> {
        let v = server_final
            .strip_prefix("v=")
            .and_then(|v| B64.decode(v).ok())
            .ok_or(Malformed("server signature"))?;
        let (auth, server_key) = self.sent.as_ref().ok_or(Malformed("out of order"))?;
        let want = hmac(server_key, &[auth.as_bytes()]);
        if bool::from(want.as_slice().ct_eq(&v)) {
            Ok(())
        } else {
            Err(ScramError::ServerSignature)
        }
    }
}

/// The tls-server-end-point binding data of a certificate (RFC 5929): its hash with the
/// hash of its signature algorithm, SHA-256 for MD5, SHA-1 and SHA-256 signatures.
pub fn end_point(cert_der: &[u8]) -> Vec<u8> {
    match signature_hash(cert_der) {
        Some(SigHash::Sha384) => sha2::Sha384::digest(cert_der).to_vec(),
        Some(SigHash::Sha512) => sha2::Sha512::digest(cert_der).to_vec(),
        _ => Sha256::digest(cert_der).to_vec(),
    }
}

enum SigHash {
    Sha384,
    Sha512,
}

/// The hash named by the certificate's signatureAlgorithm (the second element of the
/// outer SEQUENCE): the OIDs of sha384/sha512 with RSA and ECDSA.
fn signature_hash(der: &[u8]) -> Option<SigHash> {
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = b.split_first()?;
        let (&l0, rest) = rest.split_first()?;
        let (len, rest) = if l0 < 0x80 {
            (usize::from(l0), rest)
        } else {
            let n = usize::from(l0 & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |a, &x| (a << 8) | usize::from(x));
            (len, &rest[n..])
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }
    let (_, cert, _) = tlv(der)?;
    let (_, _tbs, rest) = tlv(cert)?;
    let (_, alg, _) = tlv(rest)?;
    let (tag, oid, _) = tlv(alg)?;
    if tag != 0x06 {
        return None;
    }
    const SHA384_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c];
    const SHA512_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d];
    const ECDSA_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
    const ECDSA_SHA512: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04];
    match oid {
        SHA384_RSA | ECDSA_SHA384 => Some(SigHash::Sha384),
        SHA512_RSA | ECDSA_SHA512 => Some(SigHash::Sha512),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677's example: user "user", password "pencil".
    const SALT: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";
    const CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SERVER_NONCE: &str = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_server() -> Server {
        let salt = B64.decode(SALT).expect("salt");
        let (v, _) = Verifier::from_password("pencil", &salt, 4096);
        let first = ClientFirst::parse(CLIENT_FIRST).expect("first");
        Server {
            server_first: format!("r={SERVER_NONCE},s={SALT},i=4096"),
            nonce: SERVER_NONCE.to_string(),
            verifier: v,
            first,
        }
    }

    #[test]
    fn the_rfc_7677_exchange_is_accepted_and_answered_with_its_server_signature() {
        let (client_key, server_final) = rfc_server().finish(CLIENT_FINAL, None).expect("accepted");
        assert_eq!(server_final, SERVER_FINAL);
        // The ClientKey revealed is the password's.
        let salt = B64.decode(SALT).expect("salt");
        assert_eq!(client_key, Verifier::from_password("pencil", &salt, 4096).1);
    }

    #[test]
    fn a_wrong_proof_a_wrong_nonce_and_a_binding_change_are_refused() {
        let wrong = CLIENT_FINAL.replace("p=dHzb", "p=eHzb");
        assert_eq!(rfc_server().finish(&wrong, None), Err(ScramError::Proof));
        let nonce = CLIENT_FINAL.replace("k0,p=", "k1,p=");
        assert_eq!(rfc_server().finish(&nonce, None), Err(ScramError::Nonce));
        // c= must repeat the gs2 header: "y,," here where "n,," was sent.
        let cb = CLIENT_FINAL.replace("c=biws", "c=eSws");
        assert_eq!(
            rfc_server().finish(&cb, None),
            Err(ScramError::BindingMismatch)
        );
    }

    #[test]
    fn the_verifier_of_postgresql_parses_and_nonsense_does_not() {
        let salt = B64.decode(SALT).expect("salt");
        let (v, _) = Verifier::from_password("pencil", &salt, 4096);
        let text = format!(
            "SCRAM-SHA-256$4096:{SALT}${}:{}",
            B64.encode(v.stored_key),
            B64.encode(v.server_key)
        );
        assert_eq!(Verifier::parse(&text), Some(v));
        for bad in [
            "md5abc",
            "SCRAM-SHA-256$0:AA==$AA==:AA==",
            "SCRAM-SHA-256$x",
            "",
        ] {
            assert_eq!(Verifier::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_client_with_the_revealed_key_authenticates_to_a_server_with_the_verifier() {
        let salt = b"0123456789abcdef";
        let (v, client_key) = Verifier::from_password("secret", salt, 4096);
        let mut client = Client::new(ClientSecret::Keys {
            client_key,
            server_key: v.server_key,
        });
        let server = Server::start(v.clone(), &client.client_first(), false, false).expect("start");
        let fin = client.client_final(server.server_first()).expect("final");
        let (key, server_final) = server.finish(&fin, None).expect("proof accepted");
        assert_eq!(key, client_key);
        client.verify(&server_final).expect("server verified");
        // A client with the password instead reaches the same.
        let mut by_password = Client::new(ClientSecret::Password("secret".into()));
        let server =
            Server::start(v.clone(), &by_password.client_first(), false, false).expect("start");
        let fin = by_password
            .client_final(server.server_first())
            .expect("final");
        let (key, server_final) = server.finish(&fin, None).expect("proof accepted");
        assert_eq!(key, client_key);
        by_password.verify(&server_final).expect("server verified");
        assert_eq!(
            client.verify("v=AAAA"),
            Err(ScramError::ServerSignature),
            "a wrong server signature"
        );
    }

    #[test]
    fn channel_binding_is_negotiated_as_postgresql_does() {
        let (v, _) = Verifier::from_password("x", b"salt", 4096);
        let first = |gs2: &str| format!("{gs2}n=,r=abc");
        // "p" only with the PLUS mechanism, PLUS only with "p".
        assert!(Server::start(v.clone(), &first("p=tls-server-end-point,,"), true, true).is_ok());
        assert_eq!(
            Server::start(v.clone(), &first("p=tls-server-end-point,,"), false, true).err(),
            Some(ScramError::BindingNegotiation)
        );
        assert_eq!(
            Server::start(v.clone(), &first("n,,"), true, true).err(),
            Some(ScramError::BindingNegotiation)
        );
        // "y" while PLUS was offered: a downgrade.
        assert_eq!(
            Server::start(v.clone(), &first("y,,"), false, true).err(),
            Some(ScramError::BindingNegotiation)
        );
        assert!(Server::start(v.clone(), &first("y,,"), false, false).is_ok());
        assert_eq!(
            Server::start(v, &first("p=tls-unique,,"), true, true).err(),
            Some(ScramError::UnsupportedBinding)
        );
    }

    #[test]
    fn the_parsers_refuse_malformed_messages() {
        for bad in [
            "",
            "n",
            "n,",
            "n,a=x,n=,r=1",
            "n,,m=x,n=,r=1",
            "n,,n=,r=",
            "n,,n=",
            "x,,n=,r=1",
        ] {
            assert!(ClientFirst::parse(bad).is_err(), "{bad:?}");
        }
        for bad in [
            "",
            "c=biws",
            "c=biws,p=AA==",
            "r=x,p=AA==",
            "c=!!,r=x,p=AA==",
        ] {
            assert!(ClientFinal::parse(bad).is_err(), "{bad:?}");
        }
    }
}
