//! A real hypervisor VNC server: Debian's QEMU with no disk, showing its firmware
//! screen, with security None, a VNC password, or VeNCrypt x509 (or anonymous) TLS.

use anyhow::{Context, bail};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
pub enum VncAuth {
    None,
    Password(String),
    /// `tls-creds-x509` from `dir` (ca-cert.pem, server-cert.pem, server-key.pem),
    /// demanding a client certificate; with a password the sub-type is X509Vnc.
    X509 {
        dir: PathBuf,
        password: Option<String>,
    },
    /// `tls-creds-anon`: the anonymous-TLS sub-types relay must refuse.
    AnonTls,
}

/// A QEMU process, killed on drop.
pub struct Qemu {
    child: Child,
    addr: SocketAddr,
}

impl Qemu {
    pub async fn start(auth: VncAuth) -> anyhow::Result<Qemu> {
        let mut last = String::new();
        for _ in 0..10 {
            let port = free_port()?;
            let display = port - 5900;
            let mut vnc = format!("127.0.0.1:{display}");
            let mut cmd = Command::new("/usr/bin/qemu-system-x86_64");
            cmd.args(["-nodefaults", "-machine", "pc", "-accel", "tcg", "-m", "32", "-vga", "std", "-display", "none"]);
            let password = match &auth {
                VncAuth::Password(p) => Some(p.clone()),
                VncAuth::X509 { password, .. } => password.clone(),
                _ => None,
            };
            if let Some(p) = password {
                cmd.args(["-object", &format!("secret,id=vncpw,data={p}")]);
                vnc.push_str(",password-secret=vncpw");
            }
            match &auth {
                VncAuth::X509 { dir, .. } => {
                    cmd.args(["-object", &format!("tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on", dir.display())]);
                    vnc.push_str(",tls-creds=tls0");
                }
                VncAuth::AnonTls => {
                    cmd.args(["-object", "tls-creds-anon,id=tls0,endpoint=server"]);
                    vnc.push_str(",tls-creds=tls0");
                }
                _ => {}
            }
            cmd.args(["-vnc", &vnc]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
            let child = cmd.spawn().context("starting qemu-system-x86_64")?;
            let mut qemu = Qemu { child, addr: ([127, 0, 0, 1], port).into() };
            let ready = match auth {
                VncAuth::None => qemu.wait_firmware_screen().await,
                _ => qemu.wait_ready().await,
            };
            match ready {
                Ok(()) => return Ok(qemu),
                Err(e) => last = e.to_string(),
            }
            // Usually a port race with another test: try another port.
        }
        bail!("QEMU did not start: {last}")
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Kills QEMU (SIGKILL), as when its host or process dies under a console.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the RFB greeting on the VNC port.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if let Some(status) = self.child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                bail!("QEMU exited ({status}): {err}");
            }
            if let Ok(mut s) = TcpStream::connect(self.addr).await {
                let mut greeting = [0u8; 12];
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut greeting)).await
                    && &greeting == b"RFB 003.008\n"
                {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("QEMU's VNC server did not answer within 30 s")
    }
}

impl Qemu {
    /// Without VNC authentication: waits for the firmware's text screen (720×400). QEMU
    /// answers VNC before the guest's firmware has set it (a 640×480 screen until then,
    /// longer on a loaded machine), and tests check the size a viewer is told.
    async fn wait_firmware_screen(&mut self) -> anyhow::Result<()> {
        self.wait_ready().await?;
        let started = Instant::now();
        let mut seen = (0, 0);
        while started.elapsed() < Duration::from_secs(30) {
            let mut s = TcpStream::connect(self.addr).await?;
            let init = crate::viewer::handshake(&mut s, b"RFB 003.008\n", None).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
            seen = (init.width, init.height);
            if seen == (720, 400) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("QEMU's firmware screen did not appear within 30 s (still {seen:?})")
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago, above 5900 so it maps to a VNC display number.
pub fn free_port() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let port = 20000 + (rand_u16() % 30000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port")
}

fn rand_u16() -> u16 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    (nanos ^ (std::process::id() << 7)) as u16
}
