//! relay as the RFB server the viewer talks to, up to SecurityResult.
//!
//! The viewer never learns how relay authenticated to the hypervisor: it sees None, or
//! VNC authentication when the instance has a console password of its own.

use super::wire::{Handshake, Input, Progress, VERSION_LEN, Version, put_reason};
use super::{RfbError, security, vnc_auth};

/// What the viewer must prove before it gets the console.
#[derive(Clone, PartialEq, Eq)]
pub enum ViewerAuth {
    None,
    Password(String),
}

impl std::fmt::Debug for ViewerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ViewerAuth::None => "None",
            ViewerAuth::Password(_) => "Password(<set>)",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewerDone {
    pub version: Version,
    pub security: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    ClientVersion,
    Choice,
    Response,
}

pub struct ViewerHandshake {
    auth: ViewerAuth,
    /// When set, the viewer is told this reason instead of being offered security.
    refusal: Option<String>,
    challenge: [u8; vnc_auth::CHALLENGE_LEN],
    state: State,
    version: Version,
}

impl ViewerHandshake {
    /// `challenge` must be fresh random bytes for every connection.
    pub fn new(auth: ViewerAuth, challenge: [u8; vnc_auth::CHALLENGE_LEN]) -> Self {
        ViewerHandshake { auth, refusal: None, challenge, state: State::Greeting, version: Version::V3_8 }
    }

    /// A handshake that only tells the viewer why it cannot have the console, in the
    /// form its protocol version allows.
    pub fn refuse(reason: impl Into<String>) -> Self {
        let mut h = Self::new(ViewerAuth::None, [0; vnc_auth::CHALLENGE_LEN]);
        h.refusal = Some(reason.into());
        h
    }

    fn offered(&self) -> u8 {
        match self.auth {
            ViewerAuth::None => security::NONE,
            ViewerAuth::Password(_) => security::VNC,
        }
    }

    fn done(&self) -> Progress<ViewerDone> {
        Progress::Done(ViewerDone { version: self.version, security: self.offered() })
    }

    /// SecurityResult "failed", with the reason where the version carries one.
    fn fail(&self, out: &mut Vec<u8>, error: RfbError) -> Progress<ViewerDone> {
        out.extend_from_slice(&1u32.to_be_bytes());
        if self.version == Version::V3_8 {
            put_reason(out, &error.to_string());
        }
        Progress::Failed(error)
    }

    fn start_scheme(&mut self, out: &mut Vec<u8>) -> Option<Progress<ViewerDone>> {
        match self.auth {
            ViewerAuth::Password(_) => {
                out.extend_from_slice(&self.challenge);
                self.state = State::Response;
                None
            }
            ViewerAuth::None => {
                if self.version == Version::V3_8 {
                    out.extend_from_slice(&0u32.to_be_bytes());
                }
                Some(self.done())
            }
        }
    }
}

impl Handshake for ViewerHandshake {
    type Done = ViewerDone;

    fn advance(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, Progress<ViewerDone>) {
        let mut input = Input::new(input);
        let progress = loop {
            match self.state {
                State::Greeting => {
                    out.extend_from_slice(Version::V3_8.greeting());
                    self.state = State::ClientVersion;
                }
                State::ClientVersion => {
                    let Some(msg) = input.take(VERSION_LEN) else { break Progress::NeedMore };
                    match Version::parse(msg) {
                        Ok(v) => self.version = v,
                        Err(e) => break Progress::Failed(e),
                    }
                    if let Some(reason) = &self.refusal {
                        // 3.3: security type 0 as a u32; 3.7+: an empty type list. Both
                        // followed by the reason.
                        match self.version {
                            Version::V3_3 => out.extend_from_slice(&0u32.to_be_bytes()),
                            _ => out.push(0),
                        }
                        put_reason(out, reason);
                        break Progress::Failed(RfbError::Other(reason.clone()));
                    }
                    if self.version == Version::V3_3 {
                        out.extend_from_slice(&(self.offered() as u32).to_be_bytes());
                        if let Some(p) = self.start_scheme_33(out) {
                            break p;
                        }
                    } else {
                        out.extend_from_slice(&[1, self.offered()]);
                        self.state = State::Choice;
                    }
                }
                State::Choice => {
                    let Some(choice) = input.u8() else { break Progress::NeedMore };
                    if choice != self.offered() {
                        break self.fail(out, RfbError::ViewerBadChoice(choice));
                    }
                    if let Some(p) = self.start_scheme(out) {
                        break p;
                    }
                }
                State::Response => {
                    let Some(answer) = input.take(vnc_auth::CHALLENGE_LEN) else { break Progress::NeedMore };
                    let ViewerAuth::Password(password) = &self.auth else { unreachable!("Response follows a VNC challenge") };
                    if !vnc_auth::verify(password.as_bytes(), &self.challenge, answer) {
                        break self.fail(out, RfbError::WrongPassword);
                    }
                    out.extend_from_slice(&0u32.to_be_bytes());
                    break self.done();
                }
            }
        };
        (input.consumed(), progress)
    }
}

impl ViewerHandshake {
    /// RFB 3.3 has no SecurityResult after None, but has one after VNC authentication.
    fn start_scheme_33(&mut self, out: &mut Vec<u8>) -> Option<Progress<ViewerDone>> {
        match self.auth {
            ViewerAuth::None => Some(self.done()),
            ViewerAuth::Password(_) => self.start_scheme(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rfb::testing::{check_every_split, run};

    const CHALLENGE: [u8; 16] = [0x5a; 16];

    fn none() -> ViewerHandshake {
        ViewerHandshake::new(ViewerAuth::None, CHALLENGE)
    }
    fn password() -> ViewerHandshake {
        ViewerHandshake::new(ViewerAuth::Password("secret".into()), CHALLENGE)
    }

    /// What noVNC sends after relay's greeting with security None: its version, then its
    /// choice, then ClientInit (shared flag 1).
    const NOVNC_NONE: &[u8] = b"RFB 003.008\n\x01\x01";

    #[test]
    fn novnc_none_38() {
        let (out, p, rest) = run(none(), &[NOVNC_NONE]);
        assert_eq!(out, b"RFB 003.008\n\x01\x01\x00\x00\x00\x00");
        assert_eq!(p, Progress::Done(ViewerDone { version: Version::V3_8, security: 1 }));
        assert_eq!(rest, b"\x01", "ClientInit is left for the hypervisor");
        check_every_split(none, NOVNC_NONE);
    }

    #[test]
    fn greeting_is_sent_before_any_input() {
        let (out, p, _) = run(none(), &[]);
        assert_eq!(out, b"RFB 003.008\n");
        assert_eq!(p, Progress::NeedMore);
    }

    #[test]
    fn vnc_password_right_and_wrong() {
        let mut good = b"RFB 003.008\n\x02".to_vec();
        good.extend_from_slice(&vnc_auth::response(b"secret", &CHALLENGE));
        let (out, p, _) = run(password(), &[&good]);
        let mut expected = b"RFB 003.008\n\x01\x02".to_vec();
        expected.extend_from_slice(&CHALLENGE);
        expected.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(out, expected);
        assert!(matches!(p, Progress::Done(ViewerDone { security: 2, .. })));
        check_every_split(password, &good);

        let mut bad = b"RFB 003.008\n\x02".to_vec();
        bad.extend_from_slice(&vnc_auth::response(b"secreT", &CHALLENGE));
        let (out, p, _) = run(password(), &[&bad]);
        assert_eq!(p, Progress::Failed(RfbError::WrongPassword));
        let tail = &out[expected.len() - 4..];
        assert_eq!(&tail[..4], &[0, 0, 0, 1]);
        assert_eq!(&tail[8..], b"wrong console password");
    }

    #[test]
    fn rfb_33_viewer_gets_the_33_forms() {
        let (out, p, _) = run(none(), &[b"RFB 003.003\n"]);
        assert_eq!(out, b"RFB 003.008\n\x00\x00\x00\x01");
        assert_eq!(p, Progress::Done(ViewerDone { version: Version::V3_3, security: 1 }));

        let mut bad = b"RFB 003.003\n".to_vec();
        bad.extend_from_slice(&[0; 16]);
        let (out, p, _) = run(password(), &[&bad]);
        assert_eq!(p, Progress::Failed(RfbError::WrongPassword));
        assert!(out.ends_with(&[0, 0, 0, 1]), "3.3 carries no reason after a failed SecurityResult");
        check_every_split(password, &bad);
    }

    #[test]
    fn refusal_reaches_the_viewer_in_its_versions_form() {
        let (out, p, _) = run(ViewerHandshake::refuse("hypervisor unreachable"), &[b"RFB 003.008\n"]);
        assert_eq!(out, b"RFB 003.008\n\x00\x00\x00\x00\x16hypervisor unreachable");
        assert!(matches!(p, Progress::Failed(_)));
        let (out, _, _) = run(ViewerHandshake::refuse("no"), &[b"RFB 003.003\n"]);
        assert_eq!(out, b"RFB 003.008\n\x00\x00\x00\x00\x00\x00\x00\x02no");
    }

    #[test]
    fn a_choice_not_offered_fails_with_a_reason() {
        let (out, p, _) = run(none(), &[b"RFB 003.008\n\x02"]);
        assert_eq!(p, Progress::Failed(RfbError::ViewerBadChoice(2)));
        assert!(out.starts_with(b"RFB 003.008\n\x01\x01\x00\x00\x00\x01"));
        let (out, _, _) = run(none(), &[b"RFB 003.007\n\x10"]);
        assert_eq!(out, b"RFB 003.008\n\x01\x01\x00\x00\x00\x01", "3.7 carries no reason");
    }

    #[test]
    fn a_viewer_speaking_http_is_not_rfb() {
        let (_, p, _) = run(none(), &[b"GET / HTTP/1.1\r\n\r\n"]);
        assert!(matches!(p, Progress::Failed(RfbError::NotRfb(_))));
    }
}
