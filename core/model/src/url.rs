//! Base URLs of cores and agents, as operators give them in flags.

/// `text` as the base URL of a core or an agent: `http://` or `https://`, a host and an
/// optional port, nothing after them but a trailing `/`; returned without that `/`. The error
/// says what is wrong and gives an example to copy.
pub fn base_url(text: &str) -> Result<String, String> {
    let url = text.trim();
    let Some(host) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    else {
        let hint = if url.contains("://") {
            "use http:// or https://".to_string()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_scheme_host_and_port_only() {
        assert_eq!(
            base_url("http://127.0.0.1:4848/").unwrap(),
            "http://127.0.0.1:4848"
        );
        assert_eq!(
            base_url(" https://core.example ").unwrap(),
            "https://core.example"
        );
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
