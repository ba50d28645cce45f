/**
 * Subscription: one channel's subscription on a client — its handlers, its
 * life (subscribe; resubscribe, recovering what was missed, after a
 * reconnect or when the gateway asks; retry after 503; the end on a refusal,
 * an unsubscribe or the gateway's word), its subscription token, who joins
 * and leaves the channel, and the commands that act on its channel.
 */

import type { Backoff } from "./backoff.js";
import type { Commands } from "./commands.js";
import type { PublishContent } from "./content.js";
import { encodeContent } from "./content.js";
import { StreamCursor } from "./cursor.js";
import { ErrorCode, HeraldError } from "./errors.js";
import type {
  Command,
  HistoryOptions,
  HistoryResult,
  PresenceEvent,
  PresenceResult,
  PresenceStats,
  Publication,
  ServerMessage,
  StreamPosition,
  SubscribeResult,
} from "./protocol.js";
import { decodeHistory, decodePresence, decodePresenceStats, decodeSubscribed } from "./protocol.js";
import { TokenSource } from "./token.js";

/** Options of HeraldClient.subscribe. */
export interface SubscribeOptions {
  /** Gets each publication once, in order: recovered ones first, then live ones. */
  onPublication(publication: Publication): void;
  /** Called each time the subscription takes effect: the first time, and after each reconnect. */
  onSubscribed?(info: SubscribedInfo): void;
  /**
   * A connection subscribed to the channel (namespaces with
   * `join_leave=on`): this one too, each time it subscribes on a new
   * connection.
   */
  onJoin?(event: PresenceEvent): void;
  /**
   * A connection unsubscribed from the channel or closed (namespaces with
   * `join_leave=on`). Best effort: the connections of a gateway that dies
   * are not announced.
   */
  onLeave?(event: PresenceEvent): void;
  /**
   * Gets the refusal that ended the subscription, and getToken's failures;
   * without it they go to the client's `error` event.
   */
  onError?(error: unknown): void;
  /** A subscription token, for namespaces that want one. */
  token?: string;
  /** Gets a subscription token: when there is none, when it is stale, and once after a 401. */
  getToken?: () => Promise<string>;
}

/** What a subscribe reply said, as onSubscribed is told. */
export interface SubscribedInfo {
  /** False the first time; true after a reconnect. */
  readonly resubscribed: boolean;
  /** The channel's namespace has recovery on: a resubscribe will recover what was missed. */
  readonly recoverable: boolean;
  /**
   * True when a resubscribe recovered every missed publication (handed to
   * onPublication right after). When `resubscribed` and not `recovered`,
   * publications may have been missed: reload the state another way.
   */
  readonly recovered: boolean;
  /** The channel's position when the subscription took effect (namespaces with history). */
  readonly position: StreamPosition | undefined;
}

/** Where a subscription is: waiting for its subscribe to take effect, in effect, or ended for good. */
export type SubscriptionState = "subscribing" | "subscribed" | "unsubscribed";

/** What the client tells a subscription. */
export interface ChannelListener {
  /** A connection is up: subscribe on it. */
  connected(): void;
  /** The connection is gone, and with it the subscription on the server. */
  disconnected(): void;
  /** A publication of the channel arrived. */
  publication(publication: Publication): void;
  /** A connection joined the channel. */
  joined(event: PresenceEvent): void;
  /** A connection left the channel. */
  left(event: PresenceEvent): void;
  /**
   * The gateway stopped delivering the channel: until the client subscribes
   * again with recover when `resubscribe` (a publication could not be
   * delivered), else for good.
   */
  dropped(resubscribe: boolean, reason: string): void;
}

/** What a subscription needs from its client. */
export interface SubscriptionHost {
  readonly commands: Commands;
  /** Registers the channel's listener (and calls connected() now if the client is connected). */
  attach(channel: string, listener: ChannelListener): void;
  detach(channel: string): void;
  /** A backoff for retrying subscribes, with the client's delays. */
  retryBackoff(): Backoff;
  /** Gives up on the connection and reconnects. */
  reconnect(reason: string): void;
  /** Hands an error to the client's `error` event. */
  report(error: unknown): void;
}

/** A channel subscription, made by HeraldClient.subscribe. */
export class Subscription {
  readonly channel: string;
  readonly #host: SubscriptionHost;
  readonly #options: SubscribeOptions;
  readonly #token: TokenSource;
  readonly #cursor = new StreamCursor();
  readonly #retry: Backoff;
  #state: SubscriptionState = "subscribing";
  /** Bumped by each subscribe attempt and each end of one, so that late callbacks of an old one do nothing. */
  #attempt = 0;
  #retryTimer: ReturnType<typeof setTimeout> | undefined;
  /** A subscribe was sent on this connection and is not answered yet. */
  #pending = false;
  /** The server holds the subscription on this connection. */
  #active = false;
  /** The token was already renewed after a 401, since the last success. */
  #tokenRenewed = false;
  #info: SubscribedInfo | undefined;
  #ended: HeraldError | undefined;
  #waiters: { resolve(info: SubscribedInfo): void; reject(error: HeraldError): void }[] = [];

  constructor(host: SubscriptionHost, channel: string, options: SubscribeOptions) {
    this.channel = channel;
    this.#host = host;
    this.#options = options;
    this.#token = new TokenSource(options.token, options.getToken);
    this.#retry = host.retryBackoff();
    host.attach(channel, {
      connected: () => this.#subscribe(false),
      disconnected: () => this.#connectionLost(),
      publication: (publication) => this.#deliver(publication),
      joined: (event) => this.#active && this.#call(() => this.#options.onJoin?.(event)),
      left: (event) => this.#active && this.#call(() => this.#options.onLeave?.(event)),
      dropped: (resubscribe, reason) => this.#dropped(resubscribe, reason),
    });
  }

  get state(): SubscriptionState {
    return this.#state;
  }

  /** The position of the last publication handed on (or of the subscribe reply), in a namespace with history. */
  get position(): StreamPosition | undefined {
    return this.#cursor.position;
  }

  /** Resolves when the subscription is in effect (at once if it is); rejects if it ends first. */
  subscribed(): Promise<SubscribedInfo> {
    if (this.#ended !== undefined) return Promise.reject(this.#ended);
    if (this.#state === "subscribed" && this.#info !== undefined) return Promise.resolve(this.#info);
    return new Promise((resolve, reject) => this.#waiters.push({ resolve, reject }));
  }

  /**
   * Ends the subscription: no publication reaches the handler after this
   * call. Resolves once the server has let go of it.
   */
  unsubscribe(): Promise<void> {
    if (this.#ended !== undefined) return Promise.resolve();
    const onServer = this.#pending || this.#active;
    this.#end(new HeraldError(ErrorCode.NotSubscribed, `unsubscribed from ${this.channel}`));
    if (!onServer) return Promise.resolve();
    return new Promise((resolve, reject) =>
      this.#host.commands.submit(
        { unsubscribe: { channel: this.channel } },
        {
          resolve: () => resolve(),
          // Not subscribed, or the connection (and with it the subscription) gone: done too.
          reject: (error) =>
            error.code === ErrorCode.NotSubscribed || error.code === ErrorCode.ConnectionClosed
              ? resolve()
              : reject(error),
        },
        // After the answer to a subscribe still in flight, which may yet take effect.
        { ready: () => !this.#pending },
      ),
    );
  }

  /** Publishes to the channel, once subscribed (the namespace must let subscribers publish). */
  publish(content: PublishContent): Promise<void> {
    return this.#request({ publish: { channel: this.channel, content: encodeContent(content) } }, () => undefined);
  }

  /** Who is subscribed to the channel, once subscribed (the namespace must have presence on). */
  presence(): Promise<PresenceResult> {
    return this.#request({ presence: { channel: this.channel } }, (message) => decodePresence(message.presence));
  }

  /** How many are subscribed to the channel, once subscribed (the namespace must have presence on). */
  presenceStats(): Promise<PresenceStats> {
    return this.#request({ presence_stats: { channel: this.channel } }, (message) =>
      decodePresenceStats(message.presence_stats),
    );
  }

  /**
   * Reads the channel's history, once subscribed (the namespace must keep
   * one): the newest `limit` publications, or with `since` the ones after
   * it, oldest first. Without a limit only the position comes back.
   */
  history(options: HistoryOptions = {}): Promise<HistoryResult> {
    const history: { channel: string; limit?: number; since?: StreamPosition } = { channel: this.channel };
    if (options.limit !== undefined) history.limit = options.limit;
    if (options.since !== undefined) history.since = options.since;
    return this.#request({ history }, (message) => decodeHistory(message.history));
  }

  /** Sends a command about the channel once the subscription is in effect. */
  #request<T>(command: Command, decode: (message: ServerMessage) => T): Promise<T> {
    if (this.#ended !== undefined) return Promise.reject(this.#ended);
    return new Promise((resolve, reject) =>
      this.#host.commands.submit(
        command,
        { resolve: (message) => resolve(decode(message)), reject },
        { ready: () => this.#state === "subscribed", owner: this },
      ),
    );
  }

  #subscribe(renewToken: boolean): void {
    const attempt = ++this.#attempt;
    if (!this.#token.needsFetch(renewToken)) return this.#send(attempt);
    this.#token.fetch().then(
      () => attempt === this.#attempt && this.#send(attempt),
      (error: unknown) => {
        if (attempt !== this.#attempt) return;
        this.#report(error);
        this.#retryLater();
      },
    );
  }

  #send(attempt: number): void {
    const subscribe: { channel: string; token?: string; recover?: true; since?: StreamPosition } = {
      channel: this.channel,
    };
    const token = this.#token.current?.value;
    if (token !== undefined) subscribe.token = token;
    const since = this.#cursor.recoverFrom();
    if (since !== undefined) {
      subscribe.recover = true;
      subscribe.since = since;
    }
    this.#pending = true;
    this.#host.commands.submit(
      { subscribe },
      {
        resolve: (message) => {
          if (this.#answered(attempt, true))
            this.#subscribed(decodeSubscribed(message.subscribed), since !== undefined);
        },
        reject: (error) => {
          if (this.#answered(attempt, false)) this.#refused(error);
        },
      },
    );
  }

  /**
   * Records a subscribe's answer (a refusal leaves the server as it was);
   * false if its attempt is over (an unsubscribe may wait for the answer).
   */
  #answered(attempt: number, accepted: boolean): boolean {
    this.#pending = false;
    if (accepted) this.#active = true;
    if (attempt === this.#attempt) return true;
    this.#host.commands.flush();
    return false;
  }

  #subscribed(result: SubscribeResult, recovering: boolean): void {
    this.#retry.reset();
    this.#tokenRenewed = false;
    const info: SubscribedInfo = {
      resubscribed: this.#info !== undefined,
      recoverable: result.recoverable,
      recovered: recovering && result.recovered,
      position: result.position,
    };
    this.#info = info;
    this.#state = "subscribed";
    for (const waiter of this.#waiters.splice(0)) waiter.resolve(info);
    this.#call(() => this.#options.onSubscribed?.(info));
    for (const publication of result.publications) this.#deliver(publication);
    this.#cursor.subscribed(result.recoverable, result.position);
    this.#host.commands.flush();
  }

  #refused(error: HeraldError): void {
    switch (error.code) {
      case ErrorCode.Timeout:
        return this.#host.reconnect(`subscribe to ${this.channel} got no reply`);
      case ErrorCode.Unavailable:
        return this.#retryLater();
      case ErrorCode.TokenRefused:
        if (this.#token.canRefresh && !this.#tokenRenewed) {
          this.#tokenRenewed = true;
          return this.#subscribe(true);
        }
        break;
    }
    this.#end(error);
    this.#report(error);
  }

  #retryLater(): void {
    const attempt = this.#attempt;
    this.#retryTimer = setTimeout(() => attempt === this.#attempt && this.#subscribe(false), this.#retry.next());
  }

  #dropped(resubscribe: boolean, reason: string): void {
    if (this.#state !== "subscribed") return;
    if (resubscribe) {
      // The server still holds the subscription, and takes a subscribe with recover for it.
      this.#state = "subscribing";
      return this.#subscribe(false);
    }
    this.#active = false;
    const error = new HeraldError(
      ErrorCode.NotSubscribed,
      reason || `herald ended the subscription to ${this.channel}`,
    );
    this.#end(error);
    this.#report(error);
  }

  #connectionLost(): void {
    this.#attempt++;
    clearTimeout(this.#retryTimer);
    this.#pending = false;
    this.#active = false;
    if (this.#state === "subscribed") this.#state = "subscribing";
  }

  #end(error: HeraldError): void {
    this.#attempt++;
    clearTimeout(this.#retryTimer);
    this.#state = "unsubscribed";
    this.#ended = error;
    this.#host.detach(this.channel);
    this.#host.commands.cancelOwned(this, error.code, error.message);
    for (const waiter of this.#waiters.splice(0)) waiter.reject(error);
  }

  #deliver(publication: Publication): void {
    if (this.#state === "subscribed" && this.#cursor.admit(publication)) {
      this.#call(() => this.#options.onPublication(publication));
    }
  }

  #report(error: unknown): void {
    if (this.#options.onError === undefined) return this.#host.report(error);
    this.#call(() => this.#options.onError?.(error));
  }

  /** Runs an app callback; what it throws goes to the client's `error` event. */
  #call(callback: () => void): void {
    try {
      callback();
    } catch (error) {
      this.#host.report(error);
    }
  }
}
