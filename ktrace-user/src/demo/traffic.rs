//! The demo's two incidents, played with real sockets in its namespaces:
//!
//! 1. un-NATed reply: a backend sends a segment far outside the TCP window;
//!    the node's conntrack marks it INVALID and forwards it without reverse
//!    NAT; the client, which only knows the Service address, resets it.
//! 2. conntrack flush: `conntrack -F` on the node while a connection is
//!    open; its next segment is DNATed afresh, to the other backend, which
//!    has no such connection and resets it.

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::lab::{in_netns, Lab, PORT};
use super::DemoError;

const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// Plays both incidents; stops early (Ok) when `stop` is set.
pub fn play(lab: &Lab, stop: &AtomicBool) -> Result<(), DemoError> {
    let listener = in_netns(&lab.server, || TcpListener::bind(("0.0.0.0", PORT)))
        .map_err(|e| DemoError::Traffic(format!("backend listener: {e}")))?;
    say(&format!(
        "incident 1: backend sends a segment outside the TCP window to a client of {}",
        lab.service()
    ));
    unnated_reply(lab, &listener, stop)?;
    if stop.load(Ordering::Relaxed) {
        return Ok(());
    }
    say("incident 2: conntrack -F on the node while a connection is open (two backends)");
    conntrack_flush(lab, &listener, stop)
}

fn say(what: &str) {
    eprintln!("ktrace demo: {what}");
}

/// A client connection to the Service and the backend's end of it, after
/// one echoed line.
fn connect(lab: &Lab, listener: &TcpListener) -> Result<(TcpStream, TcpStream), DemoError> {
    let vip = SocketAddr::V4(lab.service());
    let client = in_netns(&lab.client, || TcpStream::connect_timeout(&vip, IO_TIMEOUT))
        .map_err(|e| DemoError::Traffic(format!("connecting to {vip}: {e}")))?;
    let (backend, _) = listener
        .accept()
        .map_err(|e| DemoError::Traffic(format!("backend accept: {e}")))?;
    for s in [&client, &backend] {
        s.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    }
    let mut c = &client;
    c.write_all(b"hi\n").map_err(io)?;
    let mut buf = [0u8; 3];
    (&backend).read_exact(&mut buf).map_err(io)?;
    (&backend).write_all(&buf).map_err(io)?;
    c.read_exact(&mut buf).map_err(io)?;
    Ok((client, backend))
}

fn io(e: std::io::Error) -> DemoError {
    DemoError::Traffic(e.to_string())
}

/// Sends on the client's connection; true when the answer is a reset.
fn send_is_reset(client: &TcpStream) -> bool {
    let mut c = client;
    if c.write_all(b"again\n").is_err() {
        return true;
    }
    let mut buf = [0u8; 16];
    matches!(c.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
}

fn sleep(stop: &AtomicBool, d: Duration) {
    let end = std::time::Instant::now() + d;
    while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn unnated_reply(lab: &Lab, listener: &TcpListener, stop: &AtomicBool) -> Result<(), DemoError> {
    let (client, backend) = connect(lab, listener)?;
    // Let the client's ACK of the echo arrive before the stray segment.
    sleep(stop, Duration::from_millis(300));
    let raw = in_netns(&lab.server, raw_tcp_socket)
        .map_err(|e| DemoError::Traffic(format!("raw socket: {e}")))?;
    send_out_of_window(&backend, &raw)
        .map_err(|e| DemoError::Traffic(format!("out-of-window segment: {e}")))?;
    sleep(stop, Duration::from_millis(1000));
    let reset = send_is_reset(&client);
    say(&format!(
        "  the client answered the backend's own address with a reset; its next send was {}",
        if reset {
            "reset"
        } else {
            "not reset (unexpected)"
        }
    ));
    Ok(())
}

fn conntrack_flush(lab: &Lab, listener: &TcpListener, stop: &AtomicBool) -> Result<(), DemoError> {
    let (client, _backend) = connect(lab, listener)?;
    sleep(stop, Duration::from_millis(300));
    lab.in_node(&["conntrack", "-F"])?;
    let reset = send_is_reset(&client);
    say(&format!(
        "  after the flush the connection was re-mapped to the other backend: {}",
        if reset {
            "reset"
        } else {
            "not reset (unexpected)"
        }
    ));
    Ok(())
}

fn raw_tcp_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The sequence numbers of `conn` (TCP_REPAIR: the socket is not disturbed).
fn queue_seqs(conn: &TcpStream) -> std::io::Result<(u32, u32)> {
    const TCP_RECV_QUEUE: libc::c_int = 1;
    const TCP_SEND_QUEUE: libc::c_int = 2;
    let fd = conn.as_raw_fd();
    let set = |opt: libc::c_int, v: libc::c_int| {
        // SAFETY: setsockopt with an int value on our own socket.
        let r = unsafe {
            libc::setsockopt(fd, libc::SOL_TCP, opt, (&v as *const libc::c_int).cast(), 4)
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    let seq = |queue| -> std::io::Result<u32> {
        set(libc::TCP_REPAIR_QUEUE, queue)?;
        let mut v: u32 = 0;
        let mut len: libc::socklen_t = 4;
        // SAFETY: getsockopt into a u32 of the given length.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_TCP,
                libc::TCP_QUEUE_SEQ,
                (&mut v as *mut u32).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(v)
    };
    set(libc::TCP_REPAIR, 1)?;
    let seqs = seq(TCP_SEND_QUEUE).and_then(|snd| Ok((snd, seq(TCP_RECV_QUEUE)?)));
    set(libc::TCP_REPAIR, 0)?;
    seqs
}

/// One ACK|PSH segment from the backend's address with a sequence number
/// 1 GiB past what the client expects.
fn send_out_of_window(conn: &TcpStream, raw: &OwnedFd) -> std::io::Result<()> {
    let (SocketAddr::V4(local), SocketAddr::V4(peer)) = (conn.local_addr()?, conn.peer_addr()?)
    else {
        return Err(std::io::Error::other("not IPv4"));
    };
    let (snd_nxt, rcv_nxt) = queue_seqs(conn)?;
    let segment = tcp_segment(local, peer, snd_nxt.wrapping_add(1 << 30), rcv_nxt, b"x");
    // The source address must be the backend's (the server has two).
    let to_sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let (src, dst) = (to_sockaddr(local), to_sockaddr(peer));
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: bind/sendto with a valid sockaddr_in and buffer.
    unsafe {
        if libc::bind(
            raw.as_raw_fd(),
            (&src as *const libc::sockaddr_in).cast(),
            len,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let n = libc::sendto(
            raw.as_raw_fd(),
            segment.as_ptr().cast(),
            segment.len(),
            0,
            (&dst as *const libc::sockaddr_in).cast(),
            len,
        );
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A TCP header (no options) and payload with its checksum.
fn tcp_segment(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut seg = Vec::with_capacity(20 + payload.len());
    seg.extend_from_slice(&src.port().to_be_bytes());
    seg.extend_from_slice(&dst.port().to_be_bytes());
    seg.extend_from_slice(&seq.to_be_bytes());
    seg.extend_from_slice(&ack.to_be_bytes());
    seg.extend_from_slice(&[5 << 4, 0x18]); // data offset 5 words; ACK|PSH
    seg.extend_from_slice(&65535u16.to_be_bytes()); // window
    seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    seg.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(12 + seg.len());
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8]);
    pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&seg);
    let sum = checksum(&pseudo);
    seg[16..18].copy_from_slice(&sum.to_be_bytes());
    seg
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_checksum_verifies() {
        let src = "10.0.1.2:2222".parse().unwrap();
        let dst = "10.0.0.2:40000".parse().unwrap();
        let seg = tcp_segment(src, dst, 7, 9, b"x");
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src.ip().octets());
        pseudo.extend_from_slice(&dst.ip().octets());
        pseudo.extend_from_slice(&[0, 6, 0, seg.len() as u8]);
        pseudo.extend_from_slice(&seg);
        // A correct checksum makes the sum over everything 0xffff.
        assert_eq!(checksum(&pseudo), 0);
        assert_eq!(&seg[13..14], &[0x18]);
    }
}
