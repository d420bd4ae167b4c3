//! `variant`: an echo plugin whose identity is set when it is built, so that tests can build
//! plugins with other names, routes, tags and plugin-api versions from one source.
//!
//! Build-time environment: `WSHOST_VARIANT_NAME` (default `variant`), `WSHOST_VARIANT_ROUTE`
//! (default `/variant`), `WSHOST_VARIANT_TAG` (default `v`; replies are `TAG:message`),
//! `WSHOST_VARIANT_NEW` (`panic`, `abort`, `needs-config`: refuses without a `token` config key,
//! `wait-file`: blocks until the file its `release` config key names exists).

use plugin_api::{export_plugin, Conn, Handler, Host, Plugin, PluginError, Request, Response};

const TAG: &str = match option_env!("WSHOST_VARIANT_TAG") {
    Some(t) => t,
    None => "v",
};

/// The variant plugin.
#[derive(Debug)]
pub struct Variant;

impl Plugin for Variant {
    const NAME: &'static str = match option_env!("WSHOST_VARIANT_NAME") {
        Some(n) => n,
        None => "variant",
    };
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const ROUTES: &'static [&'static str] = &[match option_env!("WSHOST_VARIANT_ROUTE") {
        Some(r) => r,
        None => "/variant",
    }];

    fn new(host: Host) -> Result<Self, PluginError> {
        match option_env!("WSHOST_VARIANT_NEW") {
            Some("panic") => panic!("variant: the constructor panics on purpose"),
            Some("abort") => std::process::abort(),
            Some("needs-config") if !host.config().contains_key("token") => {
                Err(PluginError::new("variant: the config table has no `token`"))
            }
            Some("wait-file") => {
                // Blocks until the file named by its config key `release` exists (a slow
                // constructor that a test controls); says so in `release.started` first.
                if let Some(path) = host.config().get("release") {
                    let _ = std::fs::write(format!("{path}.started"), b"");
                    while !std::path::Path::new(path).exists() {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
                Ok(Variant)
            }
            _ => Ok(Variant),
        }
    }

    fn upgrade(&self, _req: &Request<'_>) -> Response {
        Response::accept(Tagged)
    }

    fn request(&self, _req: &Request<'_>) -> Response {
        Response::text(TAG)
    }
}

struct Tagged;

impl Handler for Tagged {
    fn on_text(&mut self, conn: &Conn, text: &str) {
        let _ = conn.send_text(&format!("{TAG}:{text}"));
    }
}

export_plugin!(Variant);
