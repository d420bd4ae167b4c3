// The Jetty 9.4 peer of the benchmark (Debian's libjetty9-java and libjetty9-extra-java): the
// echo server ring-jetty-ws users run today, with Jetty's WebSocket API and 1 MiB messages,
// printing the address it listens on as wshost does.

import java.nio.ByteBuffer;

import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import org.eclipse.jetty.websocket.api.Session;
import org.eclipse.jetty.websocket.api.annotations.OnWebSocketMessage;
import org.eclipse.jetty.websocket.api.annotations.WebSocket;
import org.eclipse.jetty.websocket.server.WebSocketHandler;
import org.eclipse.jetty.websocket.servlet.WebSocketServletFactory;

public class EchoServer {
    @WebSocket
    public static class Echo {
        @OnWebSocketMessage
        public void onText(Session session, String message) throws Exception {
            session.getRemote().sendString(message);
        }

        @OnWebSocketMessage
        public void onBinary(Session session, byte[] data, int offset, int length) throws Exception {
            session.getRemote().sendBytes(ByteBuffer.wrap(data, offset, length));
        }
    }

    public static void main(String[] args) throws Exception {
        Server server = new Server();
        ServerConnector connector = new ServerConnector(server);
        connector.setHost("127.0.0.1");
        connector.setPort(0);
        server.addConnector(connector);
        server.setHandler(new WebSocketHandler() {
            @Override
            public void configure(WebSocketServletFactory factory) {
                factory.getPolicy().setMaxTextMessageSize(1 << 20);
                factory.getPolicy().setMaxBinaryMessageSize(1 << 20);
                factory.getPolicy().setIdleTimeout(600_000);
                factory.register(Echo.class);
            }
        });
        server.start();
        System.out.println("listening on ws://127.0.0.1:" + connector.getLocalPort());
        server.join();
    }
}
