//! `pubsub`: a channel per path for live feeds: `/pubsub/<channel>` subscribes the connection
//! to `<channel>`, and every message a connection sends is published to it (to every host, with
//! `--bus redis://`). `?subscribe=0` publishes without receiving.
//!
//! No join or leave announcements, no history: the smallest fan-out there is, and the one the
//! broadcast benchmark measures.

use plugin_api::{export_plugin, Conn, Handler, Host, Plugin, PluginError, Request, Response};

/// The longest channel name, in bytes.
const MAX_CHANNEL: usize = 128;

/// The pubsub plugin.
#[derive(Debug)]
pub struct PubSub {
    host: Host,
}

impl Plugin for PubSub {
    const NAME: &'static str = "pubsub";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const ROUTES: &'static [&'static str] = &["/pubsub"];

    fn new(host: Host) -> Result<Self, PluginError> {
        Ok(PubSub { host })
    }

    fn upgrade(&self, req: &Request<'_>) -> Response {
        let Some(channel) = channel_of(req.path_info()) else {
            return Response::reject(400, "use /pubsub/<channel> (1-128 bytes, no '/')\n");
        };
        Response::accept(Member {
            host: self.host.clone(),
            channel: channel.to_owned(),
            subscribe: req.query_param("subscribe").as_deref() != Some("0"),
        })
    }
}

/// The channel of `/<channel>`, the path below the plugin's route.
fn channel_of(path_info: &str) -> Option<&str> {
    let channel = path_info.strip_prefix('/')?;
    (!channel.is_empty() && channel.len() <= MAX_CHANNEL && !channel.contains('/'))
        .then_some(channel)
}

/// One connection.
#[derive(Debug)]
pub struct Member {
    host: Host,
    channel: String,
    subscribe: bool,
}

impl Handler for Member {
    fn on_connect(&mut self, conn: &Conn) {
        if self.subscribe {
            if let Err(e) = conn.subscribe(&self.channel) {
                let _ = conn.close(1011, &format!("cannot subscribe: {e}"));
            }
        }
    }

    fn on_text(&mut self, _conn: &Conn, text: &str) {
        self.host.publish_text(&self.channel, text);
    }

    fn on_binary(&mut self, _conn: &Conn, data: &[u8]) {
        self.host.publish_binary(&self.channel, data);
    }
}

export_plugin!(PubSub);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::testkit::{Sent, TestConn, TestHost, TestRequest};

    #[test]
    fn members_subscribe_and_publish_to_their_channel() {
        let host = TestHost::new();
        let plugin = PubSub::new(host.host()).unwrap();
        let mut member = TestRequest::upgrade("/pubsub/prices")
            .decide(|r| plugin.upgrade(r))
            .handler()
            .unwrap();
        let conn = TestConn::new(1);
        member.on_connect(&conn).unwrap();
        assert_eq!(conn.channels(), ["prices"]);
        member.on_text(&conn, "42").unwrap();
        assert_eq!(host.published()[0].channel, "prices");
        assert_eq!(host.published()[0].message, Sent::Text("42".into()));
        // ?subscribe=0: a publisher only.
        let mut publisher = TestRequest::upgrade("/pubsub/prices?subscribe=0")
            .decide(|r| plugin.upgrade(r))
            .handler()
            .unwrap();
        let pconn = TestConn::new(2);
        publisher.on_connect(&pconn).unwrap();
        assert!(pconn.channels().is_empty());
    }

    #[test]
    fn channels() {
        assert_eq!(channel_of("/prices"), Some("prices"));
        assert_eq!(channel_of("/"), None);
        assert_eq!(channel_of("/a/b"), None);
        assert_eq!(channel_of(""), None);
    }
}
