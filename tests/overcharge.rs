//! Dishonest relays, written here from the protocol's frames, since the
//! real relay cannot be made to lie: one bills for bytes it never carried
//! (the client's payer refuses the invoice, pays nothing, closes the session
//! and reports it); one takes the client's payments and stops carrying (the
//! client, which pays as it counts, loses at most the bytes the sockets
//! between them hold, and what it paid ahead: at most its prepayment bound).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use ferry_client::relay::{DEFAULT_MAX_PREPAY_BYTES, Event, Payer, RelayAddress, Session};
use ferry_proto::wire::io::{read_frame, write_frame};
use ferry_proto::wire::{Frame, WIRE_VERSION, transcript};
use ferry_proto::{Amount, ChannelId, PricePerByte, SecretKey};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(10);

/// The relay's side of the handshake on the next connection of `listener`.
async fn handshake(listener: &TcpListener, key: &SecretKey) -> tokio::net::TcpStream {
    let (mut stream, _) = listener.accept().await.unwrap();
    let Frame::ClientHello { version, client, nonce } = read_frame(&mut stream).await.unwrap()
    else {
        panic!("expected a ClientHello")
    };
    let relay_nonce = [7u8; 32];
    let signed = transcript(b'R', version, &client, &nonce, &key.public(), &relay_nonce);
    let hello = Frame::RelayHello {
        version: WIRE_VERSION,
        relay: key.public(),
        nonce: relay_nonce,
        signature: key.sign(&signed),
    };
    write_frame(&mut stream, &hello).await.unwrap();
    assert!(matches!(read_frame(&mut stream).await.unwrap(), Frame::ClientAuth { .. }));
    stream
}

/// Opens a paying session as a relay at 1e-9 per byte with a 1 MiB window.
async fn open_session(
    listener: &TcpListener,
    key: &SecretKey,
) -> (tokio::net::TcpStream, ChannelId) {
    let mut stream = handshake(listener, key).await;
    let Frame::OpenSession { channel: Some(channel) } = read_frame(&mut stream).await.unwrap()
    else {
        panic!("expected a paying session")
    };
    let price = PricePerByte::from_attos(1_000_000_000).unwrap();
    let ready = Frame::SessionReady {
        price_per_byte: price,
        credit_window_bytes: 1 << 20,
        paid: Amount::ZERO,
        sequence: 0,
    };
    write_frame(&mut stream, &ready).await.unwrap();
    (stream, channel)
}

/// Runs one session as a relay that, once the session is open, invoices
/// `claimed_bytes` at once; returns the frames the client sent afterwards.
async fn overcharging_relay(
    listener: TcpListener,
    key: SecretKey,
    claimed_bytes: u64,
) -> Vec<Frame> {
    let (mut stream, channel) = open_session(&listener, &key).await;
    let price = PricePerByte::from_attos(1_000_000_000).unwrap();
    let due = ferry_proto::cost(claimed_bytes, price).unwrap();
    write_frame(&mut stream, &Frame::Invoice { channel, carried_bytes: claimed_bytes, due })
        .await
        .unwrap();
    let mut sent = Vec::new();
    while let Ok(Ok(frame)) = tokio::time::timeout(WAIT, read_frame(&mut stream)).await {
        let last = matches!(frame, Frame::Close { .. });
        sent.push(frame);
        if last {
            break;
        }
    }
    sent
}

/// Opens a paying session as a relay and pairs the client's first dial at
/// once; returns the session's and the tunnel's connections.
async fn paired_tunnel(
    listener: &TcpListener,
    key: &SecretKey,
) -> (tokio::net::TcpStream, tokio::net::TcpStream) {
    let (session, _) = open_session(listener, key).await;
    let mut tunnel = handshake(listener, key).await;
    let Frame::Dial { peer } = read_frame(&mut tunnel).await.unwrap() else {
        panic!("expected a Dial")
    };
    write_frame(&mut tunnel, &Frame::Connected { tunnel: 1, peer }).await.unwrap();
    (session, tunnel)
}

/// A dishonest relay's listener and key (from `seed`), and its address as
/// a client finds it.
async fn dishonest_relay(seed: u8) -> (TcpListener, SecretKey, RelayAddress) {
    let key = SecretKey::from_seed(&[seed; 32]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address =
        RelayAddress { address: listener.local_addr().unwrap().to_string(), key: key.public() };
    (listener, key, address)
}

/// A session of the client with key seed `client` at `address`, paying
/// through the channel `[channel; 32]` and ahead at most `max_prepay_bytes`.
async fn paying_session(
    address: &RelayAddress,
    client: u8,
    channel: u8,
    max_prepay_bytes: u64,
) -> Session {
    let client = SecretKey::from_seed(&[client; 32]);
    let channel = ChannelId::from_bytes([channel; 32]);
    let payer = Payer { max_prepay_bytes, ..Payer::new(channel, client.clone()) };
    Session::open(address, &client, Some(channel), Some(payer)).await.unwrap()
}

#[tokio::test]
async fn an_invoice_for_bytes_never_carried_is_refused_and_reported() {
    let (listener, relay_key, address) = dishonest_relay(1).await;
    // Nothing was carried; the relay claims 10 MiB, beyond its 1 MiB window.
    let relay = tokio::spawn(overcharging_relay(listener, relay_key, 10 << 20));
    let session = paying_session(&address, 2, 9, DEFAULT_MAX_PREPAY_BYTES).await;

    let mut events = Vec::new();
    while let Ok(Some(event)) = tokio::time::timeout(WAIT, session.next_event()).await {
        events.push(event);
    }
    assert!(
        events.contains(&Event::Overcharged { claimed_bytes: 10 << 20, counted_bytes: 0 }),
        "{events:?}"
    );
    assert!(matches!(events.last(), Some(Event::Closed { .. })), "{events:?}");
    let sent = tokio::time::timeout(WAIT, relay).await.unwrap().unwrap();
    assert!(
        !sent.iter().any(|frame| matches!(frame, Frame::Voucher(_))),
        "nothing was paid: {sent:?}"
    );
    assert!(matches!(sent.last(), Some(Frame::Close { .. })), "the client closed: {sent:?}");
}

/// The most bytes Linux lets one socket buffer hold for sending and for
/// receiving, from `tcp_wmem` and `tcp_rmem`'s maxima.
fn socket_buffer_maxima() -> u64 {
    let max = |path: &str| -> u64 {
        std::fs::read_to_string(path).unwrap().split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    max("/proc/sys/net/ipv4/tcp_wmem") + max("/proc/sys/net/ipv4/tcp_rmem")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_takes_payment_and_stops_carrying_costs_at_most_the_sockets_contents() {
    let (listener, relay_key, address) = dishonest_relay(3).await;
    // The relay keeps every voucher, pairs the tunnel at once, and never
    // reads a byte of it.
    let relay = tokio::spawn(async move {
        let (mut session, tunnel) = paired_tunnel(&listener, &relay_key).await;
        let mut paid = Amount::ZERO;
        while let Ok(Ok(frame)) = tokio::time::timeout(WAIT, read_frame(&mut session)).await {
            match frame {
                Frame::Voucher(signed) => paid = paid.max(signed.voucher.cumulative),
                Frame::Close { .. } => break,
                _ => {}
            }
        }
        drop(tunnel);
        paid
    });
    let session = paying_session(&address, 4, 5, DEFAULT_MAX_PREPAY_BYTES).await;
    let mut tunnel = session.dial(SecretKey::from_seed(&[6; 32]).public()).await.unwrap();

    // Write until the sockets are full: a write that makes no progress for
    // a second means the relay's receive buffer and this side's send buffer
    // hold all they take (an early stop under load only makes the bound
    // easier to meet).
    let chunk = vec![0x5a; 64 << 10];
    let mut written = 0u64;
    while let Ok(Ok(())) =
        tokio::time::timeout(Duration::from_secs(1), tunnel.write_all(&chunk)).await
    {
        written += chunk.len() as u64;
        assert!(written < 1 << 30, "the relay never read, yet 1 GiB went in");
    }
    // Closing pays for everything counted; the relay answers nothing, so
    // the close gives up after its timeout.
    let _ = tokio::time::timeout(Duration::from_secs(30), session.close()).await;
    let paid = tokio::time::timeout(WAIT * 3, relay).await.unwrap().unwrap();
    let price = PricePerByte::from_attos(1_000_000_000).unwrap();
    let bound = socket_buffer_maxima() + (64 << 10);
    println!(
        "stalling relay: {written} bytes written, paid {paid} (= {} bytes), bound {bound} bytes",
        paid.attos() / price.attos()
    );
    assert!(paid > Amount::ZERO, "the client paid as it counted");
    assert!(
        paid <= ferry_proto::cost(bound, price).unwrap(),
        "paid {paid} for bytes the relay never read, beyond the {bound} bytes the sockets hold"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_takes_prepayment_and_stops_carrying_costs_at_most_the_prepay_bound() {
    use tokio::io::AsyncReadExt;
    const CARRIED: u64 = 64 << 20;
    const MAX_PREPAY: u64 = 8 << 20;
    let (listener, relay_key, address) = dishonest_relay(8).await;
    // The relay carries honestly at first (it reads the tunnel and accepts
    // every voucher at once, so the client learns the payment's round trip
    // and pays ahead), then stops reading and keeps accepting.
    let relay = tokio::spawn(async move {
        let (mut session, mut tunnel) = paired_tunnel(&listener, &relay_key).await;
        let reading = tokio::spawn(async move {
            let mut buffer = vec![0; 64 << 10];
            let mut read = 0u64;
            while read < CARRIED {
                let room = buffer.len().min(usize::try_from(CARRIED - read).unwrap());
                match tunnel.read(&mut buffer[..room]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => read += n as u64,
                }
            }
            // Holds the tunnel open, unread, until the session ends.
            (tunnel, read)
        });
        let mut paid = Amount::ZERO;
        while let Ok(Ok(frame)) = tokio::time::timeout(WAIT, read_frame(&mut session)).await {
            match frame {
                Frame::Voucher(signed) => {
                    paid = paid.max(signed.voucher.cumulative);
                    let verdict = ferry_proto::wire::VoucherVerdict::Accepted;
                    let result =
                        Frame::VoucherResult { sequence: signed.voucher.sequence, verdict };
                    write_frame(&mut session, &result).await.unwrap();
                }
                Frame::Close { .. } => break,
                _ => {}
            }
        }
        let (_, read) = reading.await.unwrap();
        (paid, read)
    });
    let session = paying_session(&address, 4, 6, MAX_PREPAY).await;
    let mut tunnel = session.dial(SecretKey::from_seed(&[6; 32]).public()).await.unwrap();
    let price = PricePerByte::from_attos(1_000_000_000).unwrap();
    let worth = |bytes: u64| ferry_proto::cost(bytes, price).unwrap();
    let paid = session.paid();
    // Write until the sockets are full (as in the test above), noting
    // whether the client ever paid for more than it had written.
    let chunk = vec![0x5a; 64 << 10];
    let (mut written, mut most_ahead) = (0u64, Amount::ZERO);
    while let Ok(Ok(())) =
        tokio::time::timeout(Duration::from_secs(1), tunnel.write_all(&chunk)).await
    {
        written += chunk.len() as u64;
        let ahead = paid.borrow().checked_sub(worth(written)).unwrap_or(Amount::ZERO);
        most_ahead = most_ahead.max(ahead);
        assert!(written < 1 << 30, "the relay stopped reading, yet 1 GiB went in");
    }
    // The close hands the prepayment back; this relay ignores that.
    let _ = tokio::time::timeout(Duration::from_secs(30), session.close()).await;
    let (paid, read) = tokio::time::timeout(WAIT * 3, relay).await.unwrap().unwrap();
    let bound = read + socket_buffer_maxima() + MAX_PREPAY + (64 << 10);
    println!(
        "stalling relay after {read} bytes: {written} written, paid {} bytes' worth, at most \
         {} bytes ahead of the writes, bound {bound} bytes",
        paid.attos() / price.attos(),
        most_ahead.attos() / price.attos(),
    );
    assert_eq!(read, CARRIED, "the relay carried its first {CARRIED} bytes");
    assert!(most_ahead > Amount::ZERO, "the client paid ahead while the relay carried");
    assert!(
        most_ahead <= worth(MAX_PREPAY),
        "paid {most_ahead} ahead of the writes, beyond the prepayment bound"
    );
    assert!(
        paid <= worth(bound),
        "paid {paid}, beyond what was carried, the sockets' contents and the prepayment bound"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paying_session_the_relay_ends_lets_go_of_its_connection() {
    use tokio::io::AsyncReadExt;
    let (listener, relay_key, address) = dishonest_relay(7).await;
    // The relay ends the session, then waits for the client to close its
    // side of the connection.
    let relay = tokio::spawn(async move {
        let (mut stream, _) = open_session(&listener, &relay_key).await;
        let close =
            Frame::Close { reason: ferry_proto::wire::CloseReason::Normal, message: String::new() };
        write_frame(&mut stream, &close).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await.is_ok()
    });
    let session = paying_session(&address, 8, 6, DEFAULT_MAX_PREPAY_BYTES).await;
    while let Ok(Some(event)) = tokio::time::timeout(WAIT, session.next_event()).await {
        if matches!(event, Event::Closed { .. }) {
            break;
        }
    }
    // The application drops the ended session without closing it, as an
    // endpoint does: every task holding the connection must end.
    drop(session);
    let released = tokio::time::timeout(WAIT * 2, relay).await.unwrap().unwrap();
    assert!(released, "the client kept the connection of a session the relay ended");
}
