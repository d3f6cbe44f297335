//! Codecs below every user of them: HTTP heads (the front doors, and the dialer's
//! `internal_access_path` CONNECT), WebSocket framing and its byte-stream adapter (the
//! WebSocket door, and the relay back-ends that carry framed consoles), and a stream
//! with the bytes already read ahead of it. Nothing here knows the pipeline.

pub mod http;
pub mod prefixed;
pub mod proxy;
pub mod ws_frame;
pub mod ws_stream;
