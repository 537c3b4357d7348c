//! A relay that bills for bytes it never carried: the client's payer
//! refuses the invoice, pays nothing, closes the session and reports it.
//! The dishonest relay is written here from the protocol's frames, since
//! the real relay cannot be made to lie.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use ferry_client::relay::{Event, Payer, RelayAddress, Session};
use ferry_proto::wire::io::{read_frame, write_frame};
use ferry_proto::wire::{Frame, WIRE_VERSION, transcript};
use ferry_proto::{Amount, ChannelId, PricePerByte, SecretKey};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(10);

/// Runs one session as a relay that, once the session is open, invoices
/// `claimed_bytes` at once; returns the frames the client sent afterwards.
async fn overcharging_relay(
    listener: TcpListener,
    key: SecretKey,
    claimed_bytes: u64,
) -> Vec<Frame> {
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

#[tokio::test]
async fn an_invoice_for_bytes_never_carried_is_refused_and_reported() {
    let (relay_key, client) = (SecretKey::from_seed(&[1; 32]), SecretKey::from_seed(&[2; 32]));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = RelayAddress {
        address: listener.local_addr().unwrap().to_string(),
        key: relay_key.public(),
    };
    // Nothing was carried; the relay claims 10 MiB, beyond its 1 MiB window.
    let relay = tokio::spawn(overcharging_relay(listener, relay_key, 10 << 20));
    let channel = ChannelId::from_bytes([9; 32]);
    let payer = Payer { channel, key: client.clone() };
    let session = Session::open(&address, &client, Some(channel), Some(payer)).await.unwrap();

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
