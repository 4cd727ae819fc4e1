use super::*;
use proptest::prelude::*;

fn cfg() -> AddressConfig {
    AddressConfig::new(["sandbox.example.com", "localhost", "sbx.example.com"]).unwrap()
}

fn host(h: &str) -> Result<SandboxAddress<'_>, AddressError> {
    cfg().parse(RequestParts {
        authority: h.as_bytes(),
        path: b"/",
        ..Default::default()
    })
}

#[test]
fn host_with_port() {
    let a = host("49983-sbx-abc.sandbox.example.com").unwrap();
    assert_eq!(
        (a.id.as_ref(), a.port, a.form),
        ("sbx-abc", Some(49983), AddressForm::HostWithPort)
    );
    let a = host("8080-demo-1.localhost:10000").unwrap();
    assert_eq!((a.id.as_ref(), a.port), ("demo-1", Some(8080)));
}

#[test]
fn host_default_port_and_case() {
    let a = host("Demo-1.Sandbox.Example.com.").unwrap();
    assert_eq!(
        (a.id.as_ref(), a.port, a.form),
        ("demo-1", None, AddressForm::Host)
    );
}

#[test]
fn host_errors() {
    assert_eq!(
        host("a.b.sandbox.example.com"),
        Err(AddressError::MalformedHost)
    );
    assert_eq!(host("99999-abc.localhost"), Err(AddressError::InvalidPort));
    assert_eq!(host("0-abc.localhost"), Err(AddressError::InvalidPort));
    assert!(matches!(
        host("80-.localhost"),
        Err(AddressError::InvalidId(_))
    ));
    assert!(matches!(
        host("a_b.localhost"),
        Err(AddressError::InvalidId(_))
    ));
    // Not under a sandbox domain, no other form: missing.
    assert_eq!(host("example.org"), Err(AddressError::Missing));
    assert_eq!(host("localhost:10000"), Err(AddressError::Missing));
    assert_eq!(host("[::1]:10000"), Err(AddressError::Missing));
    // A look-alike suffix is not the domain.
    assert_eq!(host("80-abc.evillocalhost"), Err(AddressError::Missing));
}

#[test]
fn headers() {
    let a = cfg()
        .parse(RequestParts {
            authority: b"gateway.internal",
            path: b"/x",
            header_id: Some(b"abc"),
            header_port: Some(b"3000"),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        (a.id.as_ref(), a.port, a.form),
        ("abc", Some(3000), AddressForm::Header)
    );
    // The E2B SDK's pair routes the same way; ours win when both are sent, each pair on its own.
    let e2b = |id: Option<&'static [u8]>, port: Option<&'static [u8]>| {
        cfg()
            .parse(RequestParts {
                authority: b"gateway.internal",
                e2b_header_id: id,
                e2b_header_port: port,
                ..Default::default()
            })
            .map(|a| (a.id.into_owned(), a.port))
    };
    assert_eq!(
        e2b(Some(b"abc"), Some(b"49983")),
        Ok(("abc".into(), Some(49983)))
    );
    assert_eq!(e2b(Some(b"abc"), None), Ok(("abc".into(), None)));
    assert_eq!(e2b(None, Some(b"49983")), Err(AddressError::PortWithoutId));
    assert!(matches!(
        e2b(Some(b"Bad_Id"), None),
        Err(AddressError::InvalidId(_))
    ));
    let both = cfg()
        .parse(RequestParts {
            authority: b"gateway.internal",
            header_id: Some(b"ours"),
            e2b_header_id: Some(b"theirs"),
            e2b_header_port: Some(b"1"),
            ..Default::default()
        })
        .unwrap();
    assert_eq!((both.id.as_ref(), both.port), ("ours", None));
    let bad = cfg().parse(RequestParts {
        authority: b"gateway.internal",
        header_id: Some(b"abc"),
        header_port: Some(b"70000"),
        ..Default::default()
    });
    assert_eq!(bad, Err(AddressError::InvalidPort));
    let no_id = cfg().parse(RequestParts {
        authority: b"gateway.internal",
        header_port: Some(b"80"),
        ..Default::default()
    });
    assert_eq!(no_id, Err(AddressError::PortWithoutId));
}

#[test]
fn host_wins_over_headers_and_path() {
    let a = cfg()
        .parse(RequestParts {
            authority: b"80-mine.localhost",
            path: b"/sandboxes/other/81/x",
            header_id: Some(b"other"),
            e2b_header_id: Some(b"other"),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        (a.id.as_ref(), a.port, a.rewritten_path),
        ("mine", Some(80), None)
    );
}

fn path(p: &str) -> Result<SandboxAddress<'_>, AddressError> {
    cfg().parse(RequestParts {
        authority: b"gateway.internal",
        path: p.as_bytes(),
        ..Default::default()
    })
}

#[test]
fn path_form_rewrites() {
    let cases = [
        ("/sandboxes/abc/8080/api/v1?x=1", "/api/v1?x=1"),
        ("/sandboxes/abc/8080", "/"),
        ("/sandboxes/abc/8080/", "/"),
        ("/sandboxes/abc/8080?x=1", "/?x=1"),
    ];
    for (input, want) in cases {
        let a = path(input).unwrap();
        assert_eq!(a.id, "abc");
        assert_eq!(a.port, Some(8080));
        assert_eq!(a.rewritten_path.as_deref(), Some(want), "{input}");
    }
}

#[test]
fn path_errors() {
    assert_eq!(path("/sandboxes/abc"), Err(AddressError::MalformedPath));
    assert_eq!(path("/sandboxes/abc/"), Err(AddressError::MalformedPath));
    assert_eq!(path("/sandboxes/abc/x1/"), Err(AddressError::InvalidPort));
    assert!(matches!(
        path("/sandboxes/ab%63/80/"),
        Err(AddressError::InvalidId(_))
    ));
    assert!(matches!(
        path("/sandboxes//80/"),
        Err(AddressError::InvalidId(_))
    ));
    assert_eq!(path("/other"), Err(AddressError::Missing));
}

#[test]
fn domains_are_validated() {
    assert!(AddressConfig::new(["bad domain"]).is_err());
    assert!(AddressConfig::new([""]).is_err());
    assert_eq!(
        AddressConfig::new([".A.com."]).unwrap().domains(),
        ["a.com"]
    );
}

fn id_strategy() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,48}[a-z0-9])?"
}

proptest! {
    #[test]
    fn never_panics(auth in proptest::collection::vec(any::<u8>(), 0..80),
                    p in proptest::collection::vec(any::<u8>(), 0..80),
                    id in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..60)),
                    port in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8))) {
        let c = cfg();
        let r = c.parse(RequestParts { authority: &auth, path: &p, header_id: id.as_deref(), header_port: port.as_deref(), ..Default::default() });
        if let Ok(a) = r {
            prop_assert!(validate_id(&a.id).is_ok());
            prop_assert!(a.port != Some(0));
        }
    }

    #[test]
    fn host_round_trips(id in id_strategy(), port in 1u16..) {
        prop_assume!(!id.bytes().next().unwrap().is_ascii_digit() || !id.contains('-'));
        let h = format!("{port}-{id}.sandbox.example.com");
        let a = host(&h).unwrap();
        prop_assert_eq!(a.id.as_ref(), id.as_str());
        prop_assert_eq!(a.port, Some(port));
    }

    #[test]
    fn path_round_trips(id in id_strategy(), port in 1u16.., rest in "(/[a-zA-Z0-9._~-]{0,10}){0,3}(\\?[a-z=&0-9]{0,10})?") {
        let p = format!("/sandboxes/{id}/{port}{rest}");
        let a = path(&p).unwrap();
        prop_assert_eq!(a.id.as_ref(), id.as_str());
        prop_assert_eq!(a.port, Some(port));
        let rewritten = a.rewritten_path.unwrap();
        prop_assert!(rewritten.starts_with('/'));
        prop_assert!(rewritten.ends_with(rest.trim_start_matches('/')));
    }

    #[test]
    fn port_parse_matches_std(s in "[0-9]{1,6}") {
        let ours = parse_port(s.as_bytes()).ok();
        let std = s.parse::<u16>().ok().filter(|&p| p != 0 && !s.starts_with('0'));
        prop_assert_eq!(ours, std);
    }
}
