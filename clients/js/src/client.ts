/**
 * HeraldClient: a connection to a herald WebSocket gateway — opening it (its
 * token given in a `connect` command), reconnecting with backoff after every
 * close the app did not ask for (each attempt to the next of the gateways
 * given, in turn), refreshing the token before it expires, routing the
 * server's frames to commands, subscriptions and the app's events, carrying
 * the subscriptions across reconnects, and the commands to the backends:
 * rpc and send.
 */

import { Backoff } from "./backoff.js";
import { Commands } from "./commands.js";
import type { PublishContent } from "./content.js";
import { decodePayload, encodeContent } from "./content.js";
import { Emitter } from "./emitter.js";
import { ErrorCode, HeraldError } from "./errors.js";
import type { ConnectedInfo, DirectMessage, ServerMessage } from "./protocol.js";
import {
  CloseCode,
  SUBPROTOCOL,
  decodeClient,
  decodePresenceEvent,
  decodePublication,
  parseServerMessage,
} from "./protocol.js";
import type { ChannelListener, SubscribeOptions, SubscriptionHost } from "./subscription.js";
import { Subscription } from "./subscription.js";
import { TokenSource } from "./token.js";

/** The part of a WebSocket the client uses: the browser's and Node's (20 with --experimental-websocket, 22+) both fit. */
export interface WebSocketLike {
  send(data: string): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: "open", listener: () => void): void;
  addEventListener(type: "message", listener: (event: { readonly data: unknown }) => void): void;
  addEventListener(type: "close", listener: (event: { readonly code: number; readonly reason: string }) => void): void;
  addEventListener(type: "error", listener: () => void): void;
}

/** A WebSocket constructor, such as `globalThis.WebSocket`. */
export type WebSocketConstructor = new (url: string, protocols: string[]) => WebSocketLike;

/** Options of a HeraldClient. */
export interface HeraldClientOptions {
  /**
   * The connection token (a JWT), sent in a `connect` command, the
   * connection's first frame (never in the URL).
   */
  token?: string;
  /**
   * Gets a connection token: before connecting when there is none, shortly
   * before a JWT's `exp` (the new one is sent with a refresh command), and
   * before reconnecting when the token is stale or the server closed with 4001.
   */
  getToken?: () => Promise<string>;
  /** The WebSocket constructor; default `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
  /** The first reconnect delay's ceiling (full jitter); default 100 ms. */
  minReconnectDelayMs?: number;
  /** The largest reconnect delay; default 10 s. */
  maxReconnectDelayMs?: number;
  /** How long a command may wait to be sent and answered; default 10 s. */
  commandTimeoutMs?: number;
}

/** Options of an rpc. */
export interface RpcOptions {
  /**
   * How long the call may wait to be sent and answered, in milliseconds;
   * default: the client's `commandTimeoutMs`. The gateway gives the backend
   * its own `--rpc-timeout` (5 s by default), after which the call fails with
   * 504.
   */
  timeoutMs?: number;
}

/** Where the connection is. `connecting` covers waiting to reconnect. */
export type ConnectionState = "disconnected" | "connecting" | "connected";

/** Why a connection (or an attempt at one) ended, and what comes next. */
export interface DisconnectedInfo {
  /** The close code: see CloseCode. */
  readonly code: number;
  readonly reason: string;
  /** When the client tries again; undefined when it does not (the app disconnected, or a 4001 without getToken). */
  readonly reconnectDelayMs: number | undefined;
}

/** The client's events and what their listeners get. */
export interface ClientEvents {
  /** The connection is up (the server's first push), and subscriptions are being (re)made. */
  connected: ConnectedInfo;
  /** A connection or an attempt at one ended. */
  disconnected: DisconnectedInfo;
  /** A backend sent this connection a message directly (not on a channel). */
  message: DirectMessage;
  /**
   * Something failed outside any command's promise: getToken, a token
   * refresh, a subscription refused without its own onError, a frame that
   * could not be read, an app callback that threw. Without a listener, the
   * error is thrown asynchronously, like an uncaught exception.
   */
  error: unknown;
}

const DEFAULT_MIN_RECONNECT_DELAY_MS = 100;
const DEFAULT_MAX_RECONNECT_DELAY_MS = 10_000;
const DEFAULT_COMMAND_TIMEOUT_MS = 10_000;
/** Why an rpc or a send fails when its connection closes before the reply: it may have been carried out. */
const RPC_LOST = "the connection closed before the rpc's answer: the backend may or may not have handled the call";
const SEND_LOST =
  "the connection closed before the gateway confirmed the send: the backends may or may not get the message";
/** setTimeout's largest delay; a token refresh further away than this is rescheduled. */
const MAX_TIMER_MS = 2 ** 31 - 1;

export class HeraldClient {
  readonly #urls: readonly URL[];
  /** The index in #urls of the gateway the next attempt dials. */
  #nextUrl = 0;
  readonly #WebSocket: WebSocketConstructor;
  readonly #token: TokenSource;
  readonly #minReconnectDelayMs: number;
  readonly #maxReconnectDelayMs: number;
  readonly #backoff: Backoff;
  readonly #events = new Emitter<ClientEvents>((error, event) =>
    event === "error" ? throwLater(error) : this.#report(error),
  );
  readonly #commands: Commands;
  readonly #channels = new Map<string, ChannelListener>();
  readonly #host: SubscriptionHost;
  #state: ConnectionState = "disconnected";
  #connection: ConnectedInfo | undefined;
  #socket: WebSocketLike | undefined;
  /** Bumped by each connection attempt and by disconnect(), so that late callbacks of an old one do nothing. */
  #attempt = 0;
  /** The next attempt gets a new token first (after a 4001). */
  #renewToken = false;
  #reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  #refreshTimer: ReturnType<typeof setTimeout> | undefined;

  /**
   * `url` is the gateway's WebSocket URL, e.g. `wss://push.example.com/`, or
   * several gateways' URLs: the first connection attempt goes to the first,
   * and each attempt after it to the next one, in turn.
   */
  constructor(url: string | readonly string[], options: HeraldClientOptions = {}) {
    const urls = typeof url === "string" ? [url] : url;
    if (urls.length === 0) throw new TypeError("no gateway URL: give at least one");
    this.#urls = urls.map((each) => new URL(each));
    const WebSocket = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (WebSocket === undefined) {
      throw new TypeError(
        "no WebSocket: pass options.WebSocket, or run Node 20 with --experimental-websocket (Node 22+ has one)",
      );
    }
    this.#WebSocket = WebSocket;
    this.#token = new TokenSource(options.token, options.getToken);
    this.#minReconnectDelayMs = options.minReconnectDelayMs ?? DEFAULT_MIN_RECONNECT_DELAY_MS;
    this.#maxReconnectDelayMs = options.maxReconnectDelayMs ?? DEFAULT_MAX_RECONNECT_DELAY_MS;
    this.#backoff = new Backoff(this.#minReconnectDelayMs, this.#maxReconnectDelayMs);
    this.#commands = new Commands(
      { isOpen: () => this.#state === "connected", send: (frame) => this.#socket?.send(frame) },
      options.commandTimeoutMs ?? DEFAULT_COMMAND_TIMEOUT_MS,
    );
    this.#host = {
      commands: this.#commands,
      attach: (channel, listener) => {
        this.#channels.set(channel, listener);
        if (this.#state === "connected") listener.connected();
      },
      detach: (channel) => this.#channels.delete(channel),
      retryBackoff: () => new Backoff(this.#minReconnectDelayMs, this.#maxReconnectDelayMs),
      reconnect: (reason) => this.#reconnect(reason),
      report: (error) => this.#report(error),
    };
  }

  get state(): ConnectionState {
    return this.#state;
  }

  /** The current connection's address and user, while connected. */
  get connection(): ConnectedInfo | undefined {
    return this.#connection;
  }

  /** Adds an event listener; returns a function that removes it. */
  on<K extends keyof ClientEvents>(event: K, listener: (value: ClientEvents[K]) => void): () => void {
    return this.#events.on(event, listener);
  }

  /** Removes an event listener. */
  off<K extends keyof ClientEvents>(event: K, listener: (value: ClientEvents[K]) => void): void {
    this.#events.off(event, listener);
  }

  /** Connects, and stays connected (reconnecting as needed) until disconnect(). */
  connect(): void {
    if (this.#state === "disconnected") this.#open();
  }

  /**
   * Closes the connection and stops reconnecting. Commands not yet answered
   * fail with ConnectionClosed; subscriptions stay, and are made again (with
   * recovery) by the next connect().
   */
  disconnect(): void {
    if (this.#state === "disconnected") return;
    this.#attempt++;
    clearTimeout(this.#reconnectTimer);
    const socket = this.#socket;
    this.#socket = undefined;
    this.#state = "disconnected";
    this.#connectionEnded();
    this.#commands.cancelAll(ErrorCode.ConnectionClosed, "the client disconnected");
    socket?.close(CloseCode.Normal, "client disconnected");
    this.#events.emit("disconnected", {
      code: CloseCode.Normal,
      reason: "client disconnected",
      reconnectDelayMs: undefined,
    });
  }

  /**
   * Subscribes to a channel, now if connected, else once connected, and
   * again after every reconnect. One subscription per channel.
   */
  subscribe(channel: string, options: SubscribeOptions): Subscription {
    if (this.#channels.has(channel)) throw new Error(`already subscribed to ${channel}`);
    return new Subscription(this.#host, channel, options);
  }

  /**
   * Asks a backend serving `method` (see ServeCalls in broker.proto), with
   * `data` as the request: a string is sent as text, bytes as binary.
   * Resolves with the backend's answer: a string for text, a Uint8Array for
   * binary. Rejects with a HeraldError: 404 (ErrorCode.NoBackend) when no
   * backend serves the method, 504 (ErrorCode.BackendTimeout) when none
   * answered within the gateway's rpc timeout, the backend's own code and
   * message when it refused the call, 408 when there was no reply within
   * `timeoutMs`, and 499 when the connection closed after the call was sent
   * (the backend may or may not have handled it: the call is not made again).
   * A call made while disconnected waits for the connection, within
   * `timeoutMs`.
   */
  rpc(method: string, data: PublishContent, options: RpcOptions = {}): Promise<string | Uint8Array> {
    const timeoutMs = options.timeoutMs;
    if (timeoutMs !== undefined && !(timeoutMs > 0 && timeoutMs <= MAX_TIMER_MS)) {
      return Promise.reject(new RangeError(`rpc timeoutMs must be between 1 and ${MAX_TIMER_MS}, not ${timeoutMs}`));
    }
    return new Promise((resolve, reject) =>
      this.#commands.submit(
        { rpc: { method, data: encodeContent(data) } },
        {
          resolve: (message) => {
            const answer = decodePayload(message.rpc?.data);
            resolve(answer.data ?? answer.text ?? "");
          },
          reject,
        },
        { lost: RPC_LOST, ...(timeoutMs === undefined ? {} : { timeoutMs }) },
      ),
    );
  }

  /**
   * Sends `data` to the backends, as a message event of this connection
   * (see ConsumeEvents in broker.proto): a string as text, bytes as binary.
   * Resolves once the gateway took it. Rejects with a HeraldError: 403 when
   * the gateway passes no messages to backends (its `--events` lacks
   * `message`), 503 when it cannot take them now (retry later), 408 when
   * there was no reply within `commandTimeoutMs`, and 499 when the connection
   * closed after the message was sent (it may or may not have been taken: it
   * is not sent again). A message sent while disconnected waits for the
   * connection, within `commandTimeoutMs`.
   */
  send(data: PublishContent): Promise<void> {
    return new Promise((resolve, reject) =>
      this.#commands.submit(
        { send: { content: encodeContent(data) } },
        { resolve: () => resolve(), reject },
        { lost: SEND_LOST },
      ),
    );
  }

  /** Starts a connection attempt, with a new token first if one is needed. */
  #open(): void {
    const attempt = ++this.#attempt;
    this.#state = "connecting";
    if (!this.#token.needsFetch(this.#renewToken)) return this.#dial();
    this.#token.fetch().then(
      () => {
        if (attempt !== this.#attempt) return;
        this.#renewToken = false;
        this.#dial();
      },
      (error: unknown) => {
        if (attempt !== this.#attempt) return;
        this.#report(error);
        this.#reconnectTimer = setTimeout(() => this.#open(), this.#backoff.next());
      },
    );
  }

  #dial(): void {
    const url = new URL(this.#urls[this.#nextUrl]);
    this.#nextUrl = (this.#nextUrl + 1) % this.#urls.length;
    const token = this.#token.current?.value;
    let socket: WebSocketLike;
    try {
      socket = new this.#WebSocket(url.href, [SUBPROTOCOL]);
    } catch (error) {
      this.#report(error);
      this.#reconnectTimer = setTimeout(() => this.#open(), this.#backoff.next());
      return;
    }
    this.#socket = socket;
    // The token goes in the connection's first frame, out of URLs and logs.
    if (token !== undefined) socket.addEventListener("open", () => socket === this.#socket && this.#sendConnect(token));
    socket.addEventListener("message", (event) => socket === this.#socket && this.#receive(event.data));
    socket.addEventListener("close", (event) => socket === this.#socket && this.#closed(event.code, event.reason));
    // An error always means the connection failed, and its close event may
    // never come (Node 20's WebSocket gives none for a refused connection).
    socket.addEventListener("error", () => {
      if (socket !== this.#socket) return;
      this.#socket = undefined;
      socket.close();
      this.#closed(CloseCode.Abnormal, "connection failed");
    });
  }

  /**
   * Gives the token with a `connect` command, answered by `connected`. A
   * gateway that checks no token has greeted the connection already, and
   * refuses the connect (400): nothing to do. One that refuses the token
   * closes the connection with 4001 next, which #closed handles.
   */
  #sendConnect(token: string): void {
    const attempt = this.#attempt;
    const current = () => attempt === this.#attempt && this.#state === "connecting";
    this.#commands.sendNow(
      { connect: { token } },
      {
        resolve: (message: ServerMessage) => {
          if (!current()) return;
          if (message.connected === undefined) return this.#reconnect("the reply to connect was not connected");
          this.#connected(decodeClient(message.connected));
        },
        reject: (error: HeraldError) => {
          if (current() && error.code === ErrorCode.Timeout) this.#reconnect(`no reply to connect: ${error.message}`);
        },
      },
    );
  }

  #receive(data: unknown): void {
    try {
      const message = parseServerMessage(data);
      if (message.id) {
        this.#commands.settle(message);
      } else if (message.connected !== undefined) {
        this.#connected(decodeClient(message.connected));
      } else if (message.publication !== undefined) {
        const publication = decodePublication(message.publication);
        this.#channels.get(publication.channel)?.publication(publication);
      } else if (message.message !== undefined) {
        this.#events.emit("message", decodePayload(message.message.content));
      } else if (message.unsubscribed !== undefined) {
        const { channel = "", resubscribe = false, reason = "" } = message.unsubscribed;
        this.#channels.get(channel)?.dropped(resubscribe, reason);
      } else if (message.join !== undefined) {
        const event = decodePresenceEvent(message.join);
        this.#channels.get(event.channel)?.joined(event);
      } else if (message.leave !== undefined) {
        const event = decodePresenceEvent(message.leave);
        this.#channels.get(event.channel)?.left(event);
      }
    } catch (error) {
      this.#report(error);
    }
  }

  #connected(info: ConnectedInfo): void {
    this.#state = "connected";
    this.#connection = info;
    this.#backoff.reset();
    this.#scheduleRefresh();
    for (const listener of [...this.#channels.values()]) listener.connected();
    this.#commands.flush();
    this.#events.emit("connected", info);
  }

  /** The socket closed without the app asking: reconnect, unless no token could work. */
  #closed(code: number, reason: string): void {
    this.#socket = undefined;
    this.#connectionEnded();
    let delay: number | undefined;
    if (code === CloseCode.TokenExpired && !this.#token.canRefresh) {
      this.#state = "disconnected";
      this.#commands.cancelAll(ErrorCode.ConnectionClosed, "the token expired and there is no getToken to renew it");
    } else {
      if (code === CloseCode.TokenExpired) this.#renewToken = true;
      if (code === CloseCode.BadCommand) {
        this.#report(new Error(`herald refused a frame (4002: ${reason}); this is a bug in the herald client`));
      }
      // After a 4002 the same frame may well be sent again: no fast loop.
      delay = code === CloseCode.BadCommand ? this.#maxReconnectDelayMs : this.#backoff.next();
      this.#state = "connecting";
      this.#reconnectTimer = setTimeout(() => this.#open(), delay);
    }
    this.#events.emit("disconnected", { code, reason, reconnectDelayMs: delay });
  }

  /** What every end of a connection does. The subscriptions hear of it before their commands fail. */
  #connectionEnded(): void {
    clearTimeout(this.#refreshTimer);
    this.#connection = undefined;
    for (const listener of [...this.#channels.values()]) listener.disconnected();
    this.#commands.connectionLost();
  }

  /** Gives up on a connection that does not answer, and reconnects. */
  #reconnect(reason: string): void {
    const socket = this.#socket;
    if (socket === undefined) return;
    this.#socket = undefined;
    socket.close(CloseCode.Timeout, reason);
    this.#closed(CloseCode.Timeout, reason);
  }

  #scheduleRefresh(): void {
    clearTimeout(this.#refreshTimer);
    const refreshAtMs = this.#token.current?.refreshAtMs;
    if (refreshAtMs === undefined || !this.#token.canRefresh) return;
    const delay = Math.min(MAX_TIMER_MS, Math.max(0, refreshAtMs - Date.now()));
    this.#refreshTimer = setTimeout(() => this.#refresh(), delay);
  }

  /** Gets a new token and sends it with a refresh command. */
  #refresh(): void {
    if (!this.#token.current?.isStale()) return this.#scheduleRefresh();
    const attempt = this.#attempt;
    this.#token.fetch().then(
      (token) => {
        if (attempt !== this.#attempt || this.#state !== "connected") return;
        this.#commands.submit(
          { refresh: { token } },
          {
            resolve: () => this.#scheduleRefresh(),
            reject: (error) => error.code !== ErrorCode.ConnectionClosed && this.#report(error),
          },
        );
      },
      (error: unknown) => this.#report(error),
    );
  }

  #report(error: unknown): void {
    if (this.#events.has("error")) this.#events.emit("error", error);
    else throwLater(error);
  }
}

/** Throws outside the current call stack, where the platform reports uncaught errors. */
function throwLater(error: unknown): void {
  setTimeout(() => {
    throw error;
  });
}
