/**
 * Errors: HeraldError, why a command failed — refused by the server (its
 * documented code and message) or by a backend (an rpc's error, passed
 * through), or failed on the client's side (no reply in time, connection
 * closed) — and the codes there are.
 */

/** The codes a HeraldError carries. */
export const ErrorCode = {
  /** The server could not read the command. */
  BadCommand: 400,
  /** The server refused the token (connection or subscription token). */
  TokenRefused: 401,
  /** The namespace does not allow this, or not to this connection. */
  NotAllowed: 403,
  /** The channel's namespace does not exist. */
  UnknownNamespace: 404,
  /** rpc: no backend serves the method (the same code as UnknownNamespace). */
  NoBackend: 404,
  /** The connection is already subscribed to the channel. */
  AlreadySubscribed: 409,
  /** The connection (or subscription) is not subscribed to the channel. */
  NotSubscribed: 410,
  /** The command or its content is too large. */
  TooLarge: 413,
  /** The connection or the gateway holds too many subscriptions. */
  TooManySubscriptions: 429,
  /** rpc: the backend failed without a usable answer (or answered with a code outside 400-599 and 1000 up). */
  Internal: 500,
  /** The server cannot do it now; retry later. */
  Unavailable: 503,
  /** rpc: no backend answered within the gateway's rpc timeout (`--rpc-timeout`). */
  BackendTimeout: 504,
  /** Client side: the command was not answered within `commandTimeoutMs`. */
  Timeout: 408,
  /** Client side: the connection closed, or the app disconnected, before the reply. */
  ConnectionClosed: 499,
} as const;

/**
 * A failed command: `code` is one of {@link ErrorCode}, or, for an rpc, the
 * code a backend refused the call with (400-599, or 1000 and up).
 */
export class HeraldError extends Error {
  readonly code: number;

  constructor(code: number, message: string) {
    super(message);
    this.name = "HeraldError";
    this.code = code;
  }
}
