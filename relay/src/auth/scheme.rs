//! How relay may authenticate to a hypervisor: configured per deployment, overridden per
//! token, carried out by the hypervisor-side handshake (`rfb::hypervisor`).

/// A security scheme relay may use towards the hypervisor, in preference order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    None,
    Vnc,
    /// VeNCrypt with x509 TLS (certificates verified), then None, VNC password or Plain.
    Vencrypt,
}

impl Scheme {
    pub fn name(self) -> &'static str {
        match self {
            Scheme::None => "none",
            Scheme::Vnc => "vnc",
            Scheme::Vencrypt => "vencrypt",
        }
    }
}
