//! The test vectors of docs/PROTOCOL.md: computed here from fixed inputs, and
//! checked to appear verbatim in the document, so the two cannot drift apart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ferry_proto::wire::{Frame, transcript};
use ferry_proto::{
    Amount, ChannelId, HomeRelays, RelayAdvert, SecretKey, SignedRequest, SignedVoucher, Voucher,
};

/// Each vector: a name and its expected value (hex unless noted).
fn vectors() -> Vec<(&'static str, String)> {
    let client = SecretKey::from_seed(&[0x01; 32]);
    let relay = SecretKey::from_seed(&[0x02; 32]);
    let channel = ChannelId::derive(&client.public(), &relay.public(), 42);
    let voucher = Voucher { channel, sequence: 7, cumulative: "1.25".parse::<Amount>().unwrap() };
    let signed = voucher.sign(&client);
    let request = SignedRequest {
        method: "POST",
        path_and_query: "/v1/settlements",
        timestamp: 1_700_000_000,
        nonce: [0x07; 16],
        body: br#"{"vouchers":[]}"#,
    };
    let advert = RelayAdvert {
        relay: relay.public(),
        address: "relay.example.net:7000".into(),
        price_per_byte: "0.00000000005".parse().unwrap(),
        credit_window_bytes: 1_048_576,
        capacity_bytes_per_sec: 104_857_600,
        region: "eu-west".into(),
        protocol_version: 1,
        issued_at_ms: 1_700_000_000_000,
    };
    let home = HomeRelays {
        client: client.public(),
        relays: vec![relay.public()],
        direct_address: Some("203.0.113.7:4000".into()),
        issued_at_ms: 1_700_000_000_000,
    };
    let (client_nonce, relay_nonce) = ([0x11u8; 32], [0x22u8; 32]);
    let relay_transcript =
        transcript(b'R', 1, &client.public(), &client_nonce, &relay.public(), &relay_nonce);
    let client_transcript =
        transcript(b'C', 1, &client.public(), &client_nonce, &relay.public(), &relay_nonce);
    vec![
        ("client seed", hex::encode([0x01; 32])),
        ("client public key", client.public().to_string()),
        ("relay seed", hex::encode([0x02; 32])),
        ("relay public key", relay.public().to_string()),
        ("channel id (nonce 42)", channel.to_string()),
        ("voucher signing bytes", hex::encode(voucher.signing_bytes())),
        ("voucher signature", signed.signature.to_string()),
        ("signed voucher wire form", hex::encode(signed.encode())),
        ("request signing bytes", hex::encode(request.signing_bytes())),
        ("request signature", request.sign(&client).to_string()),
        ("advert signing bytes", hex::encode(advert.signing_bytes())),
        ("advert signature", advert.sign(&relay).signature.to_string()),
        ("home relays signing bytes", hex::encode(home.signing_bytes())),
        ("home relays signature", home.sign(&client).signature.to_string()),
        ("handshake transcript, relay role", hex::encode(&relay_transcript)),
        ("relay handshake signature", relay.sign(&relay_transcript).to_string()),
        ("client handshake signature", client.sign(&client_transcript).to_string()),
        ("Dial frame", hex::encode(Frame::Dial { peer: relay.public() }.encode())),
        ("Voucher frame", hex::encode(Frame::Voucher(signed).encode())),
    ]
}

#[test]
fn vectors_are_stable() {
    let vectors = vectors();
    // Known-answer values: if one changes, the protocol changed.
    let expect = |name: &str, value: &str| {
        let (_, actual) = vectors.iter().find(|(n, _)| *n == name).unwrap();
        assert_eq!(actual, value, "{name}");
    };
    // They were checked against an independent implementation (PyNaCl and
    // the blake3 Python package) following docs/PROTOCOL.md alone.
    expect("client public key", "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c");
    expect("relay public key", "8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394");
    expect(
        "channel id (nonce 42)",
        "769ea9441ec95561d8f9bd4b8e0a48e16f4b59602818b2f920531011e22e8447",
    );
    expect(
        "voucher signing bytes",
        "66657272792f766f75636865722f763100\
         769ea9441ec95561d8f9bd4b8e0a48e16f4b59602818b2f920531011e22e8447\
         0000000000000007\
         00000000000000001158e460913d0000",
    );
    expect(
        "advert signature",
        "9ca12ab80c64709b788c6e72c27f5849ebf8202e238e33b2e909ff379491140a\
         54cf21137975b82d97be9f70263aa05143419ef903634369d0ade2f445fbb408",
    );
    expect(
        "relay handshake signature",
        "94afdea7b69239a97470cb5f383deb229650143ef8d745c89d98fbaa77066c4d\
         62657aa0831a084ac6588f298c7bc84ff435121e0c70a32cb33b46113deaa70b",
    );
    expect(
        "client handshake signature",
        "69b9e46a4e2ea342b530cea33ae51b37e61c59b80aee72faac84bf0116a574b4\
         ed8852fffb1ab0c0a8f3b636f67c1ae1600fbae3960442de429833d38be0ac0d",
    );
    expect(
        "home relays signature",
        "92d835f733d14d344ebe1be057dc91215cc8240773f75142b439fa6d548ddbac\
         ff8987c82c005301245b728fc7643f20e7bd4e6d9a44344783beadf7a9ec1a0d",
    );
    expect(
        "request signature",
        "7c8b6c5a3062f36ed19d2dfc5abaee2ebf9ff712a59eb187d71eae117714e976\
         1745b60fa8f3e40ef787ef0a5351adbc3fcd328cdf86a8a824109ce1f0837708",
    );
    expect(
        "voucher signature",
        "83e83bfd57d4413686bf6d43367c8c3c36bd0f466ecef5823f63e1e39836b298\
         d6781569ab933c4436d43283a3da15907aa0d0d7bdcefbbcfec41cb1b8dec503",
    );
}

#[test]
fn vectors_verify() {
    let client = SecretKey::from_seed(&[0x01; 32]);
    let vectors = vectors();
    let wire = &vectors.iter().find(|(n, _)| *n == "signed voucher wire form").unwrap().1;
    let decoded = SignedVoucher::decode(&hex::decode(wire).unwrap()).unwrap();
    assert!(decoded.verify(&client.public()).is_ok());
    assert_eq!(decoded.voucher.sequence, 7);
    assert_eq!(decoded.voucher.cumulative.to_string(), "1.25");
}

#[test]
fn the_protocol_document_carries_every_vector() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md"))
        .expect("docs/PROTOCOL.md exists");
    for (name, value) in vectors() {
        assert!(doc.contains(&value), "docs/PROTOCOL.md lacks the {name}: {value}");
    }
}

#[test]
#[ignore = "prints the vectors for docs/PROTOCOL.md"]
fn print_vectors() {
    for (name, value) in vectors() {
        println!("{name}: {value}");
    }
}
