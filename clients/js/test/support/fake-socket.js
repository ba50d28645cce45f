/**
 * A scripted stand-in for a WebSocket, for tests of what the client says and
 * does at the protocol level when the server's answers are chosen by the
 * test: it records the frames the client sends, and the test pushes the
 * server's frames and closes.
 */

export class FakeSocket {
  /** Every socket made, oldest first. */
  static made = [];

  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.sent = [];
    this.closedWith = undefined;
    this.listeners = { open: [], message: [], close: [], error: [] };
    FakeSocket.made.push(this);
  }

  addEventListener(type, listener) {
    this.listeners[type].push(listener);
  }

  send(frame) {
    this.sent.push(JSON.parse(frame));
  }

  close(code, reason) {
    this.closedWith = { code, reason };
  }

  /** The connection opens (fake sockets do not, unless told). */
  open() {
    for (const listener of this.listeners.open) listener({});
  }

  /** The server sends a frame. */
  push(message) {
    for (const listener of this.listeners.message) listener({ data: JSON.stringify(message) });
  }

  /** The connection closes with this code. */
  end(code, reason = "") {
    for (const listener of this.listeners.close) listener({ code, reason });
  }

  /** The connection fails, with an error event and no close event (as Node 20's does when refused). */
  fail() {
    for (const listener of this.listeners.error) listener({});
  }

  /** Resolves with the n-th socket made (0-based) once it exists. */
  static async nth(n) {
    while (FakeSocket.made.length <= n) await new Promise((done) => setTimeout(done, 1));
    return FakeSocket.made[n];
  }
}
