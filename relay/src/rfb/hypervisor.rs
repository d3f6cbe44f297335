//! relay as the RFB client of the hypervisor's VNC server, up to SecurityResult.

use super::wire::{Handshake, Input, Progress, VERSION_LEN, Version};
use super::{RfbError, security, vnc_auth};
use crate::auth::Scheme;

/// The RFB security type that carries each scheme.
fn type_number(scheme: Scheme) -> u8 {
    match scheme {
        Scheme::None => security::NONE,
        Scheme::Vnc => security::VNC,
        Scheme::Vencrypt => security::VENCRYPT,
    }
}

/// VeNCrypt sub-types relay speaks: all three authenticate the server by its x509
/// certificate. The anonymous-TLS ones (TLSNone, TLSVnc, TLSPlain) need anonymous
/// Diffie-Hellman, which rustls does not do, and cannot authenticate the server anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VencryptSubtype {
    X509None,
    X509Vnc,
    X509Plain,
}

impl VencryptSubtype {
    pub fn number(self) -> u32 {
        match self {
            VencryptSubtype::X509None => vencrypt::X509_NONE,
            VencryptSubtype::X509Vnc => vencrypt::X509_VNC,
            VencryptSubtype::X509Plain => vencrypt::X509_PLAIN,
        }
    }
}

/// VeNCrypt sub-type numbers (QEMU and gtk-vnc numbering).
pub mod vencrypt {
    pub const PLAIN: u32 = 256;
    pub const TLS_NONE: u32 = 257;
    pub const TLS_VNC: u32 = 258;
    pub const TLS_PLAIN: u32 = 259;
    pub const X509_NONE: u32 = 260;
    pub const X509_VNC: u32 = 261;
    pub const X509_PLAIN: u32 = 262;
}

/// What relay may use to authenticate to one hypervisor.
#[derive(Clone, Default)]
pub struct HypervisorAuth {
    pub schemes: Vec<Scheme>,
    pub vnc_password: Option<String>,
    /// User name for VeNCrypt X509Plain (sent with `vnc_password`, inside TLS).
    pub plain_username: Option<String>,
}

impl std::fmt::Debug for HypervisorAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HypervisorAuth")
            .field("schemes", &self.schemes)
            .field("vnc_password", &self.vnc_password.as_ref().map(|_| "<set>"))
            .field("plain_username", &self.plain_username)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HypervisorDone {
    pub version: Version,
    /// The security type used (`security::NONE`, `security::VNC`, ...).
    pub security: u8,
    /// Set when VeNCrypt needs TLS now: the caller wraps the stream in TLS (verifying
    /// the server's certificate) and drives this same machine again over it.
    pub start_tls: Option<VencryptSubtype>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Version,
    /// RFB 3.3: the server picks one type and sends it as a u32.
    ServerChosenType,
    /// RFB 3.7+: the server lists types and the client picks.
    TypeList,
    /// The server refused before security; a reason follows.
    Refused,
    Challenge,
    SecurityResult,
    AuthFailedReason,
    VencryptVersion,
    VencryptVersionAck,
    VencryptSubtypes,
    VencryptSubtypeAck,
    /// TLS is up; the inner authentication of the chosen sub-type begins.
    VencryptInner,
}

pub struct HypervisorHandshake {
    auth: HypervisorAuth,
    state: State,
    version: Version,
    security: u8,
    subtype: Option<VencryptSubtype>,
}

impl HypervisorHandshake {
    pub fn new(auth: HypervisorAuth) -> Self {
        HypervisorHandshake { auth, state: State::Version, version: Version::V3_8, security: 0, subtype: None }
    }

    /// Picks the VeNCrypt sub-type: a VNC password inside TLS when relay has one, then
    /// Plain when relay has a user name, then certificate-only.
    fn choose_subtype(&self, offered: &[u32]) -> Result<VencryptSubtype, RfbError> {
        use VencryptSubtype::*;
        let has_password = self.auth.vnc_password.is_some();
        let mut wanted = Vec::new();
        if has_password {
            wanted.push(X509Vnc);
            if self.auth.plain_username.is_some() {
                wanted.push(X509Plain);
            }
        }
        wanted.push(X509None);
        if let Some(s) = wanted.into_iter().find(|s| offered.contains(&s.number())) {
            return Ok(s);
        }
        let anonymous = [vencrypt::TLS_NONE, vencrypt::TLS_VNC, vencrypt::TLS_PLAIN, vencrypt::PLAIN];
        if offered.iter().all(|t| anonymous.contains(t)) {
            return Err(RfbError::Other(format!(
                "hypervisor offers only VeNCrypt sub-types without x509 certificates ({offered:?}); relay refuses anonymous or clear-text TLS sub-types: configure the hypervisor with x509 credentials"
            )));
        }
        if offered.contains(&vencrypt::X509_VNC) || offered.contains(&vencrypt::X509_PLAIN) {
            return Err(RfbError::NoHypervisorPassword);
        }
        Err(RfbError::Other(format!("hypervisor offers VeNCrypt sub-types {offered:?}, none of which relay speaks")))
    }

    /// Picks the first configured scheme the server offers that relay can complete.
    fn choose(&self, offered: &[u8]) -> Result<Scheme, RfbError> {
        // VeNCrypt is usable without a password (X509None); whether the server insists on
        // one is found out from its sub-types.
        let usable = |s: &Scheme| s != &Scheme::Vnc || self.auth.vnc_password.is_some();
        let wanted = |s: &&Scheme| offered.contains(&type_number(**s));
        if let Some(s) = self.auth.schemes.iter().filter(wanted).find(|s| usable(s)) {
            return Ok(*s);
        }
        if self.auth.schemes.iter().any(|s| wanted(&s) && !usable(s)) {
            return Err(RfbError::NoHypervisorPassword);
        }
        Err(RfbError::NoCommonScheme {
            offered: offered.to_vec(),
            configured: self.auth.schemes.iter().map(|s| s.name().to_string()).collect(),
        })
    }

    fn done(&self) -> Progress<HypervisorDone> {
        Progress::Done(HypervisorDone { version: self.version, security: self.security, start_tls: None })
    }

    /// After a scheme is agreed: where the exchange goes next.
    fn start_scheme(&mut self, scheme: Scheme) -> Option<Progress<HypervisorDone>> {
        self.security = type_number(scheme);
        match scheme {
            Scheme::Vnc => self.state = State::Challenge,
            Scheme::Vencrypt => self.state = State::VencryptVersion,
            // 3.3 and 3.7 send no SecurityResult for None.
            Scheme::None if self.version == Version::V3_8 => self.state = State::SecurityResult,
            Scheme::None => return Some(self.done()),
        }
        None
    }
}

impl Handshake for HypervisorHandshake {
    type Done = HypervisorDone;

    fn advance(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, Progress<HypervisorDone>) {
        let mut input = Input::new(input);
        let progress = loop {
            match self.state {
                State::Version => {
                    let Some(msg) = input.take(VERSION_LEN) else { break Progress::NeedMore };
                    match Version::parse(msg) {
                        Ok(v) => self.version = v,
                        Err(e) => break Progress::Failed(e),
                    }
                    out.extend_from_slice(self.version.greeting());
                    self.state = match self.version {
                        Version::V3_3 => State::ServerChosenType,
                        _ => State::TypeList,
                    };
                }
                State::ServerChosenType => {
                    let Some(t) = input.u32() else { break Progress::NeedMore };
                    if t == security::INVALID as u32 {
                        self.state = State::Refused;
                        continue;
                    }
                    let offered = u8::try_from(t).map_err(|_| RfbError::UnexpectedSecurityType(t));
                    match offered.and_then(|t| self.choose(&[t])) {
                        Ok(scheme) => {
                            if let Some(p) = self.start_scheme(scheme) {
                                break p;
                            }
                        }
                        // VeNCrypt needs the 3.7+ type list; a 3.3 server choosing it is broken.
                        Err(_) if !matches!(t, 1 | 2) => break Progress::Failed(RfbError::UnexpectedSecurityType(t)),
                        Err(e) => break Progress::Failed(e),
                    }
                }
                State::TypeList => {
                    if input.u8_peek() == Some(0) {
                        input.u8();
                        self.state = State::Refused;
                        continue;
                    }
                    let Some(offered) = input.u8_list() else { break Progress::NeedMore };
                    match self.choose(offered) {
                        Ok(scheme) => {
                            out.push(type_number(scheme));
                            if let Some(p) = self.start_scheme(scheme) {
                                break p;
                            }
                        }
                        Err(e) => break Progress::Failed(e),
                    }
                }
                State::Refused => match input.reason() {
                    Ok(Some(reason)) => break Progress::Failed(RfbError::HypervisorRefused(reason)),
                    Ok(None) => break Progress::NeedMore,
                    Err(e) => break Progress::Failed(e),
                },
                State::Challenge => {
                    let Some(challenge) = input.take(vnc_auth::CHALLENGE_LEN) else { break Progress::NeedMore };
                    let Some(password) = &self.auth.vnc_password else {
                        break Progress::Failed(RfbError::NoHypervisorPassword);
                    };
                    let challenge = challenge.try_into().expect("took exactly CHALLENGE_LEN bytes");
                    out.extend_from_slice(&vnc_auth::response(password.as_bytes(), challenge));
                    self.state = State::SecurityResult;
                }
                State::SecurityResult => {
                    let Some(result) = input.u32() else { break Progress::NeedMore };
                    if result == 0 {
                        break self.done();
                    }
                    // Only 3.8 follows a failed SecurityResult with a reason.
                    if self.version < Version::V3_8 {
                        break Progress::Failed(RfbError::HypervisorAuthFailed(None));
                    }
                    self.state = State::AuthFailedReason;
                }
                State::VencryptVersion => {
                    let Some(v) = input.take(2) else { break Progress::NeedMore };
                    if v[0] != 0 || v[1] < 2 {
                        break Progress::Failed(RfbError::Other(format!("hypervisor speaks VeNCrypt {}.{}; relay needs 0.2", v[0], v[1])));
                    }
                    out.extend_from_slice(&[0, 2]);
                    self.state = State::VencryptVersionAck;
                }
                State::VencryptVersionAck => {
                    let Some(ack) = input.u8() else { break Progress::NeedMore };
                    // This ack means OK when it is 0 (the sub-type ack below: when 1).
                    if ack != 0 {
                        break Progress::Failed(RfbError::Other("hypervisor refused VeNCrypt version 0.2".into()));
                    }
                    self.state = State::VencryptSubtypes;
                }
                State::VencryptSubtypes => {
                    let Some(&count) = input.peek(1).and_then(|b| b.first()) else { break Progress::NeedMore };
                    let Some(list) = input.take(1 + 4 * count as usize) else { break Progress::NeedMore };
                    let offered: Vec<u32> = list[1..].chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect();
                    match self.choose_subtype(&offered) {
                        Ok(subtype) => {
                            out.extend_from_slice(&subtype.number().to_be_bytes());
                            self.subtype = Some(subtype);
                            self.state = State::VencryptSubtypeAck;
                        }
                        Err(e) => break Progress::Failed(e),
                    }
                }
                State::VencryptSubtypeAck => {
                    let Some(ack) = input.u8() else { break Progress::NeedMore };
                    if ack != 1 {
                        break Progress::Failed(RfbError::Other("hypervisor refused the VeNCrypt sub-type relay chose".into()));
                    }
                    self.state = State::VencryptInner;
                    let subtype = self.subtype;
                    break Progress::Done(HypervisorDone { version: self.version, security: self.security, start_tls: subtype });
                }
                State::VencryptInner => match self.subtype {
                    Some(VencryptSubtype::X509Vnc) => self.state = State::Challenge,
                    Some(VencryptSubtype::X509Plain) => {
                        let user = self.auth.plain_username.clone().unwrap_or_default();
                        let Some(password) = self.auth.vnc_password.clone() else {
                            break Progress::Failed(RfbError::NoHypervisorPassword);
                        };
                        out.extend_from_slice(&(user.len() as u32).to_be_bytes());
                        out.extend_from_slice(&(password.len() as u32).to_be_bytes());
                        out.extend_from_slice(user.as_bytes());
                        out.extend_from_slice(password.as_bytes());
                        self.state = State::SecurityResult;
                    }
                    // VeNCrypt sends SecurityResult after its sub-authentication whatever
                    // the RFB version, None included.
                    Some(VencryptSubtype::X509None) | None => self.state = State::SecurityResult,
                },
                State::AuthFailedReason => match input.reason() {
                    Ok(Some(reason)) => break Progress::Failed(RfbError::HypervisorAuthFailed(Some(reason))),
                    Ok(None) => break Progress::NeedMore,
                    Err(e) => break Progress::Failed(e),
                },
            }
        };
        (input.consumed(), progress)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rfb::testing::{check_every_split, run};

    fn auth(schemes: &[Scheme], password: Option<&str>) -> HypervisorHandshake {
        HypervisorHandshake::new(HypervisorAuth {
            schemes: schemes.to_vec(),
            vnc_password: password.map(str::to_string),
            plain_username: None,
        })
    }

    /// Bytes QEMU 7.2 (Debian 12) sent with `-vnc` (security None), up to SecurityResult, captured.
    const QEMU_NONE: &[u8] = b"RFB 003.008\n\x01\x01\x00\x00\x00\x00";

    #[test]
    fn qemu_none_38() {
        let (out, p, rest) = run(auth(&[Scheme::None], None), &[QEMU_NONE, b"\x00\x04tail"]);
        assert_eq!(out, b"RFB 003.008\n\x01");
        assert_eq!(p, Progress::Done(HypervisorDone { version: Version::V3_8, security: 1, start_tls: None }));
        assert_eq!(rest, b"\x00\x04tail", "bytes after SecurityResult belong to ServerInit");
        check_every_split(|| auth(&[Scheme::None], None), QEMU_NONE);
    }

    #[test]
    fn vnc_password_38_answers_the_challenge() {
        let challenge: [u8; 16] = core::array::from_fn(|i| i as u8 * 3);
        let mut server = b"RFB 003.008\n\x02\x02\x01".to_vec();
        server.extend_from_slice(&challenge);
        server.extend_from_slice(&[0, 0, 0, 0]);
        let (out, p, _) = run(auth(&[Scheme::Vnc, Scheme::None], Some("pw")), &[&server]);
        let mut expected = b"RFB 003.008\n\x02".to_vec();
        expected.extend_from_slice(&vnc_auth::response(b"pw", &challenge));
        assert_eq!(out, expected);
        assert_eq!(p, Progress::Done(HypervisorDone { version: Version::V3_8, security: 2, start_tls: None }));
        check_every_split(|| auth(&[Scheme::Vnc], Some("pw")), &server);
    }

    #[test]
    fn preference_order_is_relays_not_the_servers() {
        let server = b"RFB 003.008\n\x02\x02\x01\x00\x00\x00\x00";
        let (out, p, _) = run(auth(&[Scheme::None, Scheme::Vnc], Some("pw")), &[server]);
        assert_eq!(out.last(), Some(&1));
        assert!(matches!(p, Progress::Done(_)));
    }

    #[test]
    fn vnc_offered_without_a_password_says_so() {
        let (_, p, _) = run(auth(&[Scheme::Vnc], None), &[b"RFB 003.008\n\x01\x02"]);
        assert_eq!(p, Progress::Failed(RfbError::NoHypervisorPassword));
    }

    #[test]
    fn wrong_password_carries_the_servers_reason() {
        // Captured from QEMU 7.2 with a VNC password: offer, challenge, then the failed
        // SecurityResult whose reason ends in a NUL.
        let mut server = b"RFB 003.008\n\x01\x02".to_vec();
        server.extend_from_slice(b"\xa0Ce\xea\x95\xf7\x1f\\\xd4P\xce0g\xa5[\xd9");
        server.extend_from_slice(b"\x00\x00\x00\x01\x00\x00\x00\x16Authentication failed\x00");
        let (_, p, _) = run(auth(&[Scheme::Vnc], Some("x")), &[&server]);
        assert_eq!(p, Progress::Failed(RfbError::HypervisorAuthFailed(Some("Authentication failed".into()))));
        check_every_split(|| auth(&[Scheme::Vnc], Some("x")), &server);
    }

    #[test]
    fn refusal_before_security_is_reported() {
        let server = b"RFB 003.008\n\x00\x00\x00\x00\x0btoo many\x00\x00\x00";
        let (_, p, _) = run(auth(&[Scheme::None], None), &[&server[..]]);
        assert!(matches!(p, Progress::Failed(RfbError::HypervisorRefused(_))));
    }

    #[test]
    fn no_common_scheme() {
        let (out, p, _) = run(auth(&[Scheme::None], None), &[b"RFB 003.008\n\x01\x13"]);
        assert_eq!(out, b"RFB 003.008\n", "no choice is sent when none fits");
        assert!(matches!(p, Progress::Failed(RfbError::NoCommonScheme { .. })));
    }

    #[test]
    fn rfb_33_server_chosen_types() {
        let (out, p, _) = run(auth(&[Scheme::None], None), &[b"RFB 003.003\n\x00\x00\x00\x01"]);
        assert_eq!(out, b"RFB 003.003\n");
        assert_eq!(p, Progress::Done(HypervisorDone { version: Version::V3_3, security: 1, start_tls: None }));

        let mut server = b"RFB 003.003\n\x00\x00\x00\x02".to_vec();
        server.extend_from_slice(&[9; 16]);
        server.extend_from_slice(&[0, 0, 0, 1]);
        let (_, p, _) = run(auth(&[Scheme::Vnc], Some("pw")), &[&server]);
        assert_eq!(p, Progress::Failed(RfbError::HypervisorAuthFailed(None)));
        check_every_split(|| auth(&[Scheme::Vnc], Some("pw")), &server);

        let (_, p, _) = run(auth(&[Scheme::None], None), &[b"RFB 003.003\n\x00\x00\x01\x00"]);
        assert_eq!(p, Progress::Failed(RfbError::UnexpectedSecurityType(256)));
    }

    #[test]
    fn rfb_37_none_has_no_security_result() {
        let (out, p, rest) = run(auth(&[Scheme::None], None), &[b"RFB 003.007\n\x01\x01SI"]);
        assert_eq!(out, b"RFB 003.007\n\x01");
        assert_eq!(p, Progress::Done(HypervisorDone { version: Version::V3_7, security: 1, start_tls: None }));
        assert_eq!(rest, b"SI");
    }

    #[test]
    fn garbage_is_not_rfb() {
        let (out, p, _) = run(auth(&[Scheme::None], None), &[b"SSH-2.0-OpenSSH_9.2\r\n"]);
        assert!(out.is_empty());
        assert!(matches!(p, Progress::Failed(RfbError::NotRfb(_))));
    }

    fn vencrypt(password: Option<&str>, user: Option<&str>) -> HypervisorHandshake {
        HypervisorHandshake::new(HypervisorAuth {
            schemes: vec![Scheme::Vencrypt, Scheme::Vnc],
            vnc_password: password.map(str::to_string),
            plain_username: user.map(str::to_string),
        })
    }

    /// QEMU with `tls-creds-x509` and a password offers VeNCrypt alone, with X509Vnc.
    const QEMU_X509_VNC: &[u8] = b"RFB 003.008\n\x01\x13\x00\x02\x00\x01\x00\x00\x01\x05\x01";

    #[test]
    fn vencrypt_x509vnc_stops_for_tls_then_answers_inside_it() {
        let (out, p, rest) = run(vencrypt(Some("pw"), None), &[QEMU_X509_VNC]);
        assert_eq!(out, b"RFB 003.008\n\x13\x00\x02\x00\x00\x01\x05");
        let tls = Some(VencryptSubtype::X509Vnc);
        assert_eq!(p, Progress::Done(HypervisorDone { version: Version::V3_8, security: 19, start_tls: tls }));
        assert!(rest.is_empty());
        check_every_split(|| vencrypt(Some("pw"), None), QEMU_X509_VNC);

        // After TLS: the same machine, fed what comes inside the tunnel.
        let mut machine = vencrypt(Some("pw"), None);
        let (_, first) = machine.advance(QEMU_X509_VNC, &mut Vec::new());
        assert!(matches!(first, Progress::Done(HypervisorDone { start_tls: Some(_), .. })));
        let challenge = [3u8; 16];
        let mut inner = challenge.to_vec();
        inner.extend_from_slice(&[0, 0, 0, 0]);
        let mut out = Vec::new();
        let (used, p) = machine.advance(&inner, &mut out);
        assert_eq!(used, inner.len());
        assert_eq!(out, vnc_auth::response(b"pw", &challenge));
        assert_eq!(p, Progress::Done(HypervisorDone { version: Version::V3_8, security: 19, start_tls: None }));
    }

    #[test]
    fn vencrypt_without_password_takes_x509none() {
        let server = b"RFB 003.008\n\x01\x13\x00\x02\x00\x02\x00\x00\x01\x05\x00\x00\x01\x04\x01";
        let (out, p, _) = run(vencrypt(None, None), &[server]);
        assert!(out.ends_with(&260u32.to_be_bytes()));
        assert!(matches!(p, Progress::Done(HypervisorDone { start_tls: Some(VencryptSubtype::X509None), .. })));
        let only_vnc = b"RFB 003.008\n\x01\x13\x00\x02\x00\x01\x00\x00\x01\x05";
        assert_eq!(run(vencrypt(None, None), &[only_vnc]).1, Progress::Failed(RfbError::NoHypervisorPassword));
    }

    #[test]
    fn vencrypt_plain_sends_credentials_inside_tls() {
        let server = b"RFB 003.008\n\x01\x13\x00\x02\x00\x01\x00\x00\x01\x06\x01";
        let mut machine = vencrypt(Some("pw"), Some("admin"));
        let (_, p) = machine.advance(server, &mut Vec::new());
        assert!(matches!(p, Progress::Done(HypervisorDone { start_tls: Some(VencryptSubtype::X509Plain), .. })));
        let mut out = Vec::new();
        let (_, p) = machine.advance(b"\x00\x00\x00\x00", &mut out);
        assert_eq!(out, b"\x00\x00\x00\x05\x00\x00\x00\x02adminpw");
        assert!(matches!(p, Progress::Done(HypervisorDone { start_tls: None, .. })));
    }

    #[test]
    fn anonymous_tls_is_refused_not_downgraded() {
        // QEMU with tls-creds-anon offers TLSNone/TLSVnc only.
        let server = b"RFB 003.008\n\x01\x13\x00\x02\x00\x02\x00\x00\x01\x01\x00\x00\x01\x02";
        let (out, p, _) = run(vencrypt(Some("pw"), None), &[server]);
        assert!(out.ends_with(b"\x00\x02"), "no sub-type is chosen");
        let Progress::Failed(RfbError::Other(msg)) = p else { panic!("{p:?}") };
        assert!(msg.contains("without x509"), "{msg}");
        let old = b"RFB 003.008\n\x01\x13\x00\x01";
        assert!(matches!(run(vencrypt(None, None), &[old]).1, Progress::Failed(RfbError::Other(_))));
        let refused = b"RFB 003.008\n\x01\x13\x00\x02\x01";
        assert!(matches!(run(vencrypt(None, None), &[refused]).1, Progress::Failed(RfbError::Other(_))));
    }
}
