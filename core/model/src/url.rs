//! Base URLs of cores and agents, as operators give them in flags.

/// `text` as the base URL of a core or an agent: `http://` (every part speaks plain HTTP), a
/// host and an optional port, nothing after them but a trailing `/`; returned without that `/`.
/// The error says what is wrong and gives an example to copy.
pub fn base_url(text: &str) -> Result<String, String> {
    let url = text.trim();
    if url.starts_with("https://") {
        return Err(format!(
            "'{text}': Cloud48's cores, agents and CLI speak plain HTTP; use http:// (across an \
             untrusted network, through a tunnel or a TLS proxy that forwards to it)"
        ));
    }
    let Some(host) = url.strip_prefix("http://") else {
        let hint = if url.contains("://") {
            "use http://".to_string()
        } else {
            format!("begin it with http://, as in http://{url}")
        };
        return Err(format!("'{text}' is not an http:// URL: {hint}"));
    };
    let host = host.trim_end_matches('/');
    if host.is_empty() || host.contains(['/', '?', '#', '@']) || host.contains(char::is_whitespace)
    {
        return Err(format!(
            "'{text}' is not a base URL: give the scheme, host and port only, as in http://10.0.0.1:4848 (no path)"
        ));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// `e` with the errors beneath it, as one line (`a: b: c`): an HTTP client's "error sending
/// request" says why only in its sources (connection refused, timed out, no route).
pub fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_reads_with_its_causes_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let outer = std::io::Error::other(io);
        // `other` shows its source's text itself: it is not repeated.
        assert_eq!(with_causes(&outer), "connection refused");
        #[derive(Debug)]
        struct Sending(std::io::Error);
        impl std::fmt::Display for Sending {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("error sending request")
            }
        }
        impl std::error::Error for Sending {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Sending(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        ));
        assert_eq!(with_causes(&e), "error sending request: connection refused");
    }

    #[test]
    fn base_urls_are_scheme_host_and_port_only() {
        assert_eq!(
            base_url("http://127.0.0.1:4848/").unwrap(),
            "http://127.0.0.1:4848"
        );
        assert_eq!(
            base_url(" http://core.example ").unwrap(),
            "http://core.example"
        );
        let tls = base_url("https://core.example").unwrap_err();
        assert!(tls.contains("speak plain HTTP; use http://"), "{tls}");
        let no_scheme = base_url("127.0.0.1:4848").unwrap_err();
        assert!(no_scheme.contains("http://127.0.0.1:4848"), "{no_scheme}");
        assert!(base_url("ftp://x:1").unwrap_err().contains("use http://"));
        for bad in [
            "http://",
            "http://core:4848/v1",
            "http://a b:1",
            "http://u@core:1",
        ] {
            assert!(base_url(bad).unwrap_err().contains("no path"), "{bad}");
        }
    }
}
