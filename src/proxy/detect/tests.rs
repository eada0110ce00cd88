use super::*;

/// A minimal but well-formed TLS 1.3 ClientHello record offering `alpn`.
fn client_hello(alpn: &[&[u8]]) -> Vec<u8> {
    let mut exts = Vec::new();
    // server_name-less, supported_versions: TLS 1.3
    exts.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
    if !alpn.is_empty() {
        let mut list = Vec::new();
        for p in alpn {
            list.push(p.len() as u8);
            list.extend_from_slice(p);
        }
        exts.extend_from_slice(&[0x00, 0x10]);
        exts.extend_from_slice(&((list.len() + 2) as u16).to_be_bytes());
        exts.extend_from_slice(&(list.len() as u16).to_be_bytes());
        exts.extend_from_slice(&list);
    }
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one suite
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![0x01];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend_from_slice(&hs);
    record
}

#[test]
fn a_client_hello_offering_the_mesh_alpn_is_mesh_tls() {
    let hello = client_hello(&[b"h2", MESH_ALPN]);
    assert_eq!(classify(&hello), Progress::Done(Protocol::Tls(Alpn::Mesh)));
}

#[test]
fn a_client_hello_with_other_protocols_is_application_tls() {
    assert_eq!(
        classify(&client_hello(&[b"h2", b"http/1.1"])),
        Progress::Done(Protocol::Tls(Alpn::Other))
    );
}

#[test]
fn a_client_hello_without_alpn_says_so() {
    assert_eq!(
        classify(&client_hello(&[])),
        Progress::Done(Protocol::Tls(Alpn::Absent))
    );
}

#[test]
fn a_truncated_client_hello_asks_for_more_at_every_length() {
    let hello = client_hello(&[MESH_ALPN]);
    for len in 1..hello.len() {
        assert_eq!(
            classify(&hello[..len]),
            Progress::NeedMore,
            "at {len} bytes"
        );
    }
}

#[test]
fn a_corrupt_client_hello_never_reads_out_of_bounds() {
    let hello = client_hello(&[MESH_ALPN]);
    for i in 5..hello.len() {
        for byte in [0x00, 0xff, 0x7f] {
            let mut bad = hello.clone();
            bad[i] = byte;
            // Any answer is fine; it must not panic and must not claim mesh
            // unless the ALPN bytes are intact.
            let _ = classify(&bad);
        }
    }
}

#[test]
fn recognises_http1_request_lines() {
    for req in [
        &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
        b"POST /api/x?y=1 HTTP/1.0\r\n",
        b"OPTIONS * HTTP/1.1\n",
    ] {
        assert_eq!(
            classify(req),
            Progress::Done(Protocol::Http1),
            "{:?}",
            String::from_utf8_lossy(req)
        );
    }
}

#[test]
fn waits_for_the_end_of_an_http1_request_line() {
    assert_eq!(classify(b"GE"), Progress::NeedMore);
    assert_eq!(classify(b"GET /long/path"), Progress::NeedMore);
}

#[test]
fn recognises_the_http2_preface_and_waits_for_all_of_it() {
    assert_eq!(classify(H2_PREFACE), Progress::Done(Protocol::Http2));
    assert_eq!(classify(&H2_PREFACE[..10]), Progress::NeedMore);
    // A preface that goes wrong is HTTP-shaped and not served.
    assert_eq!(
        classify(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"),
        Progress::Done(Protocol::MalformedHttp)
    );
}

#[test]
fn binary_and_other_text_protocols_are_unknown_at_once() {
    for other in [
        &b"\x00\x00\x00\x08\x04\xd2\x16\x2f"[..],
        b"*1\r\n$4\r\nPING\r\n",
        b"SSH-2.0-OpenSSH\r\n",
        b"HELLO\r\n",
    ] {
        assert_eq!(
            classify(other),
            Progress::Done(Protocol::Unknown),
            "{other:?}"
        );
    }
    // A Redis inline command looks like a method but has no HTTP version.
    assert_eq!(classify(b"PING\r\n"), Progress::Done(Protocol::Unknown));
}

#[test]
fn http_shaped_lines_that_are_not_served_requests_are_refused() {
    for malformed in [
        &b"GET / HTTP/1.2\r\n"[..],
        b"GET / HTTP/3\r\n",
        b"GET\t/ HTTP/1.1\r\n",
        b"GET  / HTTP/1.1\r\n",
        b"GET / HTTP/1.1 \r\n",
        b"GET /\x80 HTTP/1.1\r\n",
        b"GET / HTTP/1.1\rX\r\n",
        b"GET /\r\n",
        b"get\x0b/ HTTP/1.1\r\n",
        // A text protocol whose first word takes arguments looks like
        // HTTP too (memcached, Redis inline): its port belongs on the
        // opaque list.
        b"SET key value\r\n",
    ] {
        assert_eq!(
            classify(malformed),
            Progress::Done(Protocol::MalformedHttp),
            "{:?}",
            String::from_utf8_lossy(malformed)
        );
    }
}

#[test]
fn a_request_line_longer_than_the_limit_is_refused_not_waited_for() {
    let mut long = b"GET /".to_vec();
    long.resize(MAX_REQUEST_LINE, b'a');
    assert_eq!(classify(&long), Progress::Done(Protocol::MalformedHttp));
    assert_eq!(classify(&long[..MAX_REQUEST_LINE - 1]), Progress::NeedMore);
    long.extend_from_slice(b" HTTP/1.1\r\n");
    assert_eq!(classify(&long), Progress::Done(Protocol::MalformedHttp));
}

#[test]
fn a_stalled_prefix_is_refused_if_it_could_still_become_a_request() {
    assert_eq!(stalled(b""), Stalled::Silent);
    assert_eq!(stalled(b"GET /x HTTP/1.1"), Stalled::MalformedHttp);
    assert_eq!(stalled(b"GET\t"), Stalled::MalformedHttp);
    assert_eq!(stalled(&H2_PREFACE[..5]), Stalled::MalformedHttp);
    // A bare word is watched, not refused: it may be a client-first
    // protocol waiting for its answer.
    assert_eq!(stalled(b"GE"), Stalled::Word);
    assert_eq!(stalled(b"before"), Stalled::Word);
    assert_eq!(stalled(b"\x16\x03\x01\x02"), Stalled::Opaque);
    assert_eq!(stalled(b"\x00\x01"), Stalled::Opaque);
    assert_eq!(after_word(b' '), AfterWord::HttpShaped);
    assert_eq!(after_word(b'T'), AfterWord::StillAWord);
    assert_eq!(after_word(b'\n'), AfterWord::NotHttp);
}

#[test]
fn each_detection_leads_to_one_next_step() {
    assert_eq!(Detection::Closed.next(), None);
    assert_eq!(Detection::Silent.next(), Some(Next::AwaitFirstWord));
    assert_eq!(
        Detection::Detected(Protocol::Http1).next(),
        Some(Next::Serve(Version::Http1))
    );
    assert_eq!(
        Detection::Stalled(Stalled::MalformedHttp).next(),
        Some(Next::Refuse)
    );
    assert_eq!(
        Detection::Stalled(Stalled::Word).next(),
        Some(Next::RelayWatchingTheWord)
    );
    assert_eq!(
        Detection::Detected(Protocol::Tls(Alpn::Other)).next(),
        Some(Next::Relay)
    );
}

#[tokio::test]
async fn reading_stops_at_the_deadline_when_the_client_is_silent() {
    // `_client` stays open but silent.
    let (_client, mut server) = tokio::io::duplex(64);
    let mut buf = BytesMut::new();
    let got = read_and_classify(
        &mut server,
        &mut buf,
        deadline_after(Duration::from_millis(50)),
        4096,
    )
    .await
    .unwrap();
    assert_eq!(got, Detection::Silent);
}

#[tokio::test]
async fn reading_collects_a_request_split_across_writes() {
    use tokio::io::AsyncWriteExt;
    let (mut client, mut server) = tokio::io::duplex(64);
    let writer = tokio::spawn(async move {
        client.write_all(b"GET /x ").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        client.write_all(b"HTTP/1.1\r\n\r\n").await.unwrap();
        client
    });
    let mut buf = BytesMut::new();
    let got = read_and_classify(
        &mut server,
        &mut buf,
        deadline_after(Duration::from_secs(5)),
        4096,
    )
    .await
    .unwrap();
    assert_eq!(got, Detection::Detected(Protocol::Http1));
    assert_eq!(&buf[..], b"GET /x HTTP/1.1\r\n\r\n");
    drop(writer.await.unwrap());
}

#[tokio::test]
async fn a_half_sent_request_line_at_the_deadline_is_refused() {
    use tokio::io::AsyncWriteExt;
    let (mut client, mut server) = tokio::io::duplex(64);
    client.write_all(b"GET /slow").await.unwrap();
    let mut buf = BytesMut::new();
    let got = read_and_classify(
        &mut server,
        &mut buf,
        deadline_after(Duration::from_millis(50)),
        4096,
    )
    .await
    .unwrap();
    assert_eq!(got, Detection::Stalled(Stalled::MalformedHttp));
    // A half-close after part of a line is judged the same way.
    let (mut client, mut server) = tokio::io::duplex(64);
    client.write_all(b"GET / HTTP/1.1").await.unwrap();
    drop(client);
    let mut buf = BytesMut::new();
    let got = read_and_classify(
        &mut server,
        &mut buf,
        deadline_after(Duration::from_secs(5)),
        4096,
    )
    .await
    .unwrap();
    assert_eq!(got, Detection::Stalled(Stalled::MalformedHttp));
}

#[test]
fn a_configured_timeout_never_overflows_the_clock() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let far = deadline_after(Duration::from_secs(u64::MAX));
        assert!(far > tokio::time::Instant::now() + Duration::from_secs(86_400 * 365));
    });
}

#[tokio::test]
async fn a_client_that_closes_silently_is_reported_closed() {
    let (client, mut server) = tokio::io::duplex(64);
    drop(client);
    let mut buf = BytesMut::new();
    let got = read_and_classify(
        &mut server,
        &mut buf,
        deadline_after(Duration::from_secs(5)),
        4096,
    )
    .await
    .unwrap();
    assert_eq!(got, Detection::Closed);
}
