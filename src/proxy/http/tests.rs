use super::*;

fn facts(version: Version, direction: Direction) -> RouteFacts {
    RouteFacts {
        version,
        direction,
        from_mesh_peer: false,
        upgrade: false,
        connect: false,
        mesh_http2_possible: true,
        converted: false,
    }
}

#[test]
fn outbound_http1_rides_mesh_http2_unless_the_destination_has_no_proxy() {
    let f = facts(Version::Http1, Direction::Outbound);
    assert_eq!(route(f), Route::Http1OverHttp2);
    let unmeshed = RouteFacts {
        mesh_http2_possible: false,
        ..f
    };
    assert_eq!(route(unmeshed), Route::Http1 { upgrade: false });
}

#[test]
fn upgrades_and_connect_get_an_http1_connection_of_their_own() {
    let f = facts(Version::Http1, Direction::Outbound);
    let upgrade = RouteFacts { upgrade: true, ..f };
    assert_eq!(route(upgrade), Route::Http1 { upgrade: true });
    let connect = RouteFacts { connect: true, ..f };
    assert_eq!(route(connect), Route::Http1 { upgrade: false });
}

#[test]
fn only_a_converted_request_from_a_mesh_peer_goes_back_to_http1() {
    let f = facts(Version::Http2, Direction::Inbound);
    let converted_from_peer = RouteFacts {
        from_mesh_peer: true,
        converted: true,
        ..f
    };
    assert_eq!(route(converted_from_peer), Route::Http1 { upgrade: false });
    // A plaintext client cannot ask for the conversion.
    let converted_from_plaintext = RouteFacts {
        converted: true,
        ..f
    };
    assert_eq!(route(converted_from_plaintext), Route::Http2);
    let native = RouteFacts {
        from_mesh_peer: true,
        ..f
    };
    assert_eq!(route(native), Route::Http2);
}

#[test]
fn inbound_http1_stays_http1() {
    let f = facts(Version::Http1, Direction::Inbound);
    assert_eq!(route(f), Route::Http1 { upgrade: false });
}
