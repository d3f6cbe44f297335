//! relay as the RFB client of the hypervisor's VNC server, up to SecurityResult.

use super::wire::{Handshake, Input, Progress, Version, VERSION_LEN};
use super::{RfbError, security, vnc_auth};

/// A security scheme relay may use towards the hypervisor, in preference order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    None,
    Vnc,
}

impl Scheme {
    fn type_number(self) -> u8 {
        match self {
            Scheme::None => security::NONE,
            Scheme::Vnc => security::VNC,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Scheme::None => "none",
            Scheme::Vnc => "vnc",
        }
    }
}

/// What relay may use to authenticate to one hypervisor.
#[derive(Clone, Default)]
pub struct HypervisorAuth {
    pub schemes: Vec<Scheme>,
    pub vnc_password: Option<String>,
}

impl std::fmt::Debug for HypervisorAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HypervisorAuth")
            .field("schemes", &self.schemes)
            .field("vnc_password", &self.vnc_password.as_ref().map(|_| "<set>"))
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HypervisorDone {
    pub version: Version,
    /// The security type used (`security::NONE`, `security::VNC`, ...).
    pub security: u8,
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
}

pub struct HypervisorHandshake {
    auth: HypervisorAuth,
    state: State,
    version: Version,
    security: u8,
}

impl HypervisorHandshake {
    pub fn new(auth: HypervisorAuth) -> Self {
        HypervisorHandshake { auth, state: State::Version, version: Version::V3_8, security: 0 }
    }

    /// Picks the first configured scheme the server offers that relay can complete.
    fn choose(&self, offered: &[u8]) -> Result<Scheme, RfbError> {
        let usable = |s: &Scheme| s != &Scheme::Vnc || self.auth.vnc_password.is_some();
        let wanted = |s: &&Scheme| offered.contains(&s.type_number());
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
        Progress::Done(HypervisorDone { version: self.version, security: self.security })
    }

    /// After a scheme is agreed: where the exchange goes next.
    fn start_scheme(&mut self, scheme: Scheme) -> Option<Progress<HypervisorDone>> {
        self.security = scheme.type_number();
        match scheme {
            Scheme::Vnc => self.state = State::Challenge,
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
                            out.push(scheme.type_number());
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
        })
    }

    /// Bytes a QEMU 10 VNC server sends with `-vnc :0` (security None), up to SecurityResult.
    const QEMU_NONE: &[u8] = b"RFB 003.008\n\x01\x01\x00\x00\x00\x00";

    #[test]
    fn qemu_none_38() {
        let (out, p, rest) = run(auth(&[Scheme::None], None), &[QEMU_NONE, b"\x00\x04tail"]);
        assert_eq!(out, b"RFB 003.008\n\x01");
        assert_eq!(p, Progress::Done(HypervisorDone { version: Version::V3_8, security: 1 }));
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
        assert_eq!(p, Progress::Done(HypervisorDone { version: Version::V3_8, security: 2 }));
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
        let mut server = b"RFB 003.008\n\x01\x02".to_vec();
        server.extend_from_slice(&[7; 16]);
        server.extend_from_slice(b"\x00\x00\x00\x01\x00\x00\x00\x15Authentication failed\x00");
        server.truncate(server.len() - 1); // QEMU's reason sometimes ends in NUL; this one not
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
        assert_eq!(p, Progress::Done(HypervisorDone { version: Version::V3_3, security: 1 }));

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
        assert_eq!(p, Progress::Done(HypervisorDone { version: Version::V3_7, security: 1 }));
        assert_eq!(rest, b"SI");
    }

    #[test]
    fn garbage_is_not_rfb() {
        let (out, p, _) = run(auth(&[Scheme::None], None), &[b"SSH-2.0-OpenSSH_9.2\r\n"]);
        assert!(out.is_empty());
        assert!(matches!(p, Progress::Failed(RfbError::NotRfb(_))));
    }
}
