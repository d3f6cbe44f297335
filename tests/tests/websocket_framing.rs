//! WebSocket framing at the door: RFB cut into messages any way the browser likes,
//! fragmented messages, ping/pong, and the size limit.

use futures_util::{SinkExt, StreamExt};
use relay::control::proto::Request;
use relay_tests::fake_hypervisor::{FakeVnc, SERVER_INIT_LEN, Script};
use relay_tests::relay_server::TestRelay;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Collects binary payloads until `n` bytes have come; answers nothing itself.
async fn read_n(ws: &mut Ws, n: usize, pongs: &mut Vec<Vec<u8>>) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < n {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("in time").expect("open").expect("valid");
        match msg {
            Message::Binary(b) => got.extend_from_slice(&b),
            Message::Pong(p) => pongs.push(p.to_vec()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got.len(), n, "no more than asked for");
    got
}

/// RFB None through the door, one message per RFB message, up to ServerInit.
async fn console(relay: &TestRelay, instance: &str, hv: &FakeVnc) -> Ws {
    let token = relay.token(instance, hv.addr()).await;
    let mut ws = relay.websocket_frames(&format!("/?token={token}")).await;
    let mut pongs = Vec::new();
    assert_eq!(read_n(&mut ws, 12, &mut pongs).await, b"RFB 003.008\n");
    // noVNC may cut RFB anywhere: the version arrives in two messages.
    ws.send(Message::binary(&b"RFB 003"[..])).await.unwrap();
    ws.send(Message::binary(&b".008\n"[..])).await.unwrap();
    assert_eq!(read_n(&mut ws, 2, &mut pongs).await, [1, 1]);
    ws.send(Message::binary(vec![1u8])).await.unwrap();
    assert_eq!(read_n(&mut ws, 4, &mut pongs).await, [0, 0, 0, 0]);
    ws.send(Message::binary(vec![1u8])).await.unwrap();
    assert_eq!(read_n(&mut ws, SERVER_INIT_LEN, &mut pongs).await.len(), SERVER_INIT_LEN);
    ws
}

#[tokio::test]
async fn fragments_and_pings() {
    let hv = FakeVnc::start(Script::echo()).await;
    let relay = TestRelay::start().await;
    let mut ws = console(&relay, "vm-frames", &hv).await;
    let mut pongs = Vec::new();

    ws.send(Message::Frame(Frame::message(&b"frag"[..], OpCode::Data(Data::Binary), false))).await.unwrap();
    ws.send(Message::Ping(b"are you there".to_vec().into())).await.unwrap();
    ws.send(Message::Frame(Frame::message(&b"mented"[..], OpCode::Data(Data::Continue), true))).await.unwrap();
    assert_eq!(read_n(&mut ws, 10, &mut pongs).await, b"fragmented");
    ws.send(Message::binary(&b"x"[..])).await.unwrap();
    assert_eq!(read_n(&mut ws, 1, &mut pongs).await, b"x");
    assert_eq!(pongs, vec![b"are you there".to_vec()], "a ping between fragments is answered");

    // A close from the viewer ends the console and is answered.
    ws.close(None).await.unwrap();
    let rest: Vec<_> = tokio::time::timeout(Duration::from_secs(5), ws.collect::<Vec<_>>()).await.unwrap();
    assert!(rest.iter().all(|m| !matches!(m, Ok(Message::Binary(_)))), "{rest:?}");
}

#[tokio::test]
async fn oversize_and_text_messages_end_the_console() {
    let hv = FakeVnc::start(Script::echo()).await;
    let relay = TestRelay::start_with(|c| c.limits.max_ws_message_bytes = 4096).await;
    let mut ws = console(&relay, "vm-big", &hv).await;
    ws.send(Message::binary(vec![7u8; 4096])).await.unwrap();
    assert_eq!(read_n(&mut ws, 4096, &mut Vec::new()).await.len(), 4096, "up to the limit is fine");
    let _ = ws.send(Message::binary(vec![7u8; 4097])).await;
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Binary(b) = m {
                panic!("no echo of an oversize message ({} bytes)", b.len());
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "relay closed the console");

    let mut ws = console(&relay, "vm-text", &hv).await;
    ws.send(Message::text("hello")).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), async { while let Some(Ok(_)) = ws.next().await {} }).await;
    assert!(ended.is_ok(), "a text frame on a binary console ends it");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(relay.ctl(Request::Sessions { instance: None }).await.unwrap()["sessions"].as_array().unwrap().is_empty());
}
