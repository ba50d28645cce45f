/**
 * Commands in flight: their ids, the replies they wait for, and their
 * deadlines. A command waits in line until the connection is up and its own
 * condition holds (its subscription is in effect, say), is then sent, and is
 * settled by its reply, by its deadline, or by the connection's end.
 * Replies are delivered synchronously, before the frame after them is read.
 * The `connect` command alone goes out before the connection is up
 * (sendNow), as its first frame.
 */

import { ErrorCode, HeraldError } from "./errors.js";
import type { Command, ServerMessage } from "./protocol.js";

/** Largest command id: ids must survive a JavaScript number. */
const MAX_ID = Number.MAX_SAFE_INTEGER;

/** What a command's sender is told: the reply, or why there is none. */
export interface Reply {
  resolve(message: ServerMessage): void;
  reject(error: HeraldError): void;
}

/** When a command may be sent, and who it belongs to. */
export interface SubmitOptions {
  /** Sent only once this holds (checked at each flush); default: as soon as connected. */
  ready?: () => boolean;
  /** A tag for cancelOwned(). */
  owner?: object;
  /** How long it may wait to be sent and answered; default: the client's commandTimeoutMs. */
  timeoutMs?: number;
  /**
   * Why it fails when its connection closes after it was sent (code 499);
   * default: "the connection closed before the reply".
   */
  lost?: string;
}

interface Entry {
  readonly command: Command;
  readonly reply: Reply;
  readonly ready: () => boolean;
  readonly owner: object | undefined;
  readonly timer: ReturnType<typeof setTimeout>;
  readonly timeoutMs: number;
  readonly lost: string;
  /** Its id, once sent. */
  id: number | undefined;
}

/** The transport the commands go out on. */
export interface CommandLink {
  /** Whether commands can be sent now. */
  isOpen(): boolean;
  /** Sends one frame. */
  send(frame: string): void;
}

export class Commands {
  readonly #link: CommandLink;
  readonly #timeoutMs: number;
  #lastId = 0;
  #waiting: Entry[] = [];
  readonly #sent = new Map<number, Entry>();

  constructor(link: CommandLink, timeoutMs: number) {
    this.#link = link;
    this.#timeoutMs = timeoutMs;
  }

  /** Queues a command; it is sent at the first flush where the link is open and it is ready. */
  submit(command: Command, reply: Reply, options: SubmitOptions = {}): void {
    this.#waiting.push(this.#entry(command, reply, options));
    this.flush();
  }

  /**
   * Sends a command at once, whether the link counts as open or not: the
   * `connect` command, the first frame of a connection that is not up yet.
   * It is settled like any other.
   */
  sendNow(command: Command, reply: Reply, options: SubmitOptions = {}): void {
    this.#send(this.#entry(command, reply, options));
  }

  #entry(command: Command, reply: Reply, options: SubmitOptions): Entry {
    const timeoutMs = options.timeoutMs ?? this.#timeoutMs;
    const entry: Entry = {
      command,
      reply,
      ready: options.ready ?? (() => true),
      owner: options.owner,
      timer: setTimeout(() => this.#expire(entry), timeoutMs),
      timeoutMs,
      lost: options.lost ?? "the connection closed before the reply",
      id: undefined,
    };
    return entry;
  }

  #send(entry: Entry): void {
    this.#lastId = this.#lastId >= MAX_ID ? 1 : this.#lastId + 1;
    entry.id = this.#lastId;
    this.#sent.set(entry.id, entry);
    this.#link.send(JSON.stringify({ id: entry.id, ...entry.command }));
  }

  /** Sends, in order, every waiting command that can go now. */
  flush(): void {
    if (!this.#link.isOpen()) return;
    const still: Entry[] = [];
    for (const entry of this.#waiting) {
      if (!entry.ready()) {
        still.push(entry);
        continue;
      }
      this.#send(entry);
    }
    this.#waiting = still;
  }

  /** Hands a reply to its command (a reply to none, say one that timed out, is dropped). */
  settle(message: ServerMessage): void {
    const entry = message.id === undefined ? undefined : this.#sent.get(message.id);
    if (entry?.id === undefined) return;
    this.#sent.delete(entry.id);
    clearTimeout(entry.timer);
    if (message.error !== undefined) {
      entry.reply.reject(new HeraldError(message.error.code ?? 0, message.error.message ?? "refused"));
    } else {
      entry.reply.resolve(message);
    }
  }

  /** The connection ended: the commands sent on it get no reply; the waiting ones keep waiting. */
  connectionLost(): void {
    const sent = [...this.#sent.values()];
    this.#sent.clear();
    for (const entry of sent) this.#fail(entry, ErrorCode.ConnectionClosed, entry.lost);
  }

  /** Fails every command, sent or waiting. */
  cancelAll(code: number, message: string): void {
    const all = [...this.#waiting, ...this.#sent.values()];
    this.#waiting = [];
    this.#sent.clear();
    for (const entry of all) this.#fail(entry, code, message);
  }

  /** Fails the waiting commands of one owner. */
  cancelOwned(owner: object, code: number, message: string): void {
    const owned = this.#waiting.filter((entry) => entry.owner === owner);
    this.#waiting = this.#waiting.filter((entry) => entry.owner !== owner);
    for (const entry of owned) this.#fail(entry, code, message);
  }

  #expire(entry: Entry): void {
    if (entry.id !== undefined) {
      this.#sent.delete(entry.id);
      entry.reply.reject(new HeraldError(ErrorCode.Timeout, `no reply within ${entry.timeoutMs} ms`));
    } else {
      this.#waiting = this.#waiting.filter((waiting) => waiting !== entry);
      entry.reply.reject(new HeraldError(ErrorCode.Timeout, `could not be sent within ${entry.timeoutMs} ms`));
    }
  }

  #fail(entry: Entry, code: number, message: string): void {
    clearTimeout(entry.timer);
    entry.reply.reject(new HeraldError(code, message));
  }
}
