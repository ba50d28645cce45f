/**
 * The wire format of the `herald.json.v1` subprotocol
 * (proto/herald/v1/client.proto, protobuf JSON mapping with the .proto field
 * names): the commands the client sends, the messages the server sends, and
 * their decoding into the library's types. The server may omit any field
 * that holds its default value (false, 0, "", an empty list, an unset
 * message); decoding reads a missing field as that default.
 */

import type { Content, Payload } from "./content.js";
import { decodePayload } from "./content.js";

/** The WebSocket subprotocol the client speaks. */
export const SUBPROTOCOL = "herald.json.v1";

/** A place in a channel's stream: a publication's offset in the stream's epoch (its life). */
export interface StreamPosition {
  /** The publication's offset; 0 is before the first publication. */
  readonly offset: number;
  /** The stream's epoch; empty before the first publication. */
  readonly epoch: string;
}

/** A publication on a channel. `offset` and `epoch` are 0 and "" in namespaces without history. */
export interface Publication extends Payload {
  readonly channel: string;
  readonly offset: number;
  readonly epoch: string;
}

/** A message a backend sent to this connection directly (not on a channel). */
export type DirectMessage = Payload;

/** A connection's address and user: this connection's, or a subscriber's in presence. */
export interface ClientInfo {
  readonly workerId: string;
  readonly connectionId: string;
  /** Empty for an anonymous connection. */
  readonly userId: string;
}

/** What `connected` tells about this connection. */
export type ConnectedInfo = ClientInfo;

/** A connection that joined or left a channel (namespaces with `join_leave=on`). */
export interface PresenceEvent extends ClientInfo {
  /** The channel joined or left. */
  readonly channel: string;
}

/** Who is subscribed to a channel. */
export interface PresenceResult {
  readonly channel: string;
  readonly clients: readonly ClientInfo[];
  /** Gateways whose subscribers are missing because they did not answer in time. */
  readonly missingWorkers: readonly string[];
}

/** How many are subscribed to a channel. */
export interface PresenceStats {
  readonly channel: string;
  readonly connections: number;
  readonly users: number;
  /** Gateways not counted because they did not answer in time. */
  readonly missingWorkers: readonly string[];
}

/** Part of a channel's history. */
export interface HistoryResult {
  readonly channel: string;
  /** Stored publications, oldest first. */
  readonly publications: readonly Publication[];
  /** The channel's newest position. */
  readonly position: StreamPosition;
  /** With `since`: nothing after it is missing from `publications` (up to the limit). */
  readonly complete: boolean;
}

/** What a subscribe reply said, decoded. */
export interface SubscribeResult {
  readonly position: StreamPosition | undefined;
  readonly recoverable: boolean;
  readonly recovered: boolean;
  readonly publications: readonly Publication[];
}

/** A command, without its id. */
export type Command =
  | { connect: { token: string } }
  | { subscribe: { channel: string; token?: string; recover?: true; since?: StreamPosition } }
  | { unsubscribe: { channel: string } }
  | { publish: { channel: string; content: Content } }
  | { refresh: { token: string } }
  | { presence: { channel: string } }
  | { presence_stats: { channel: string } }
  | { history: { channel: string; limit?: number; since?: StreamPosition } }
  | { send: { content: Content } }
  | { rpc: { method: string; data: Content } };

type Wire<T> = Partial<T> | undefined;
type WireContent = Partial<{ text: string; binary: string }>;
type WirePosition = Wire<{ offset: number; epoch: string }>;
type WirePublication = Wire<{ channel: string; content: WireContent; offset: number; epoch: string }>;
type WireClient = Wire<{ worker_id: string; connection_id: string; user_id: string }>;
type WirePresenceEvent = Wire<{ channel: string; info: WireClient }>;

/** A message from the server, as read: a reply (id > 0) or a push (id 0 or absent). */
export interface ServerMessage {
  id?: number;
  error?: Wire<{ code: number; message: string }>;
  /** A push, the connection's first message; or the reply to connect. */
  connected?: WireClient;
  publication?: WirePublication;
  message?: Wire<{ content: WireContent }>;
  /** As a push: the gateway stopped delivering a channel; with resubscribe, until it is subscribed again with recover. */
  unsubscribed?: Wire<{ channel: string; resubscribe: boolean; reason: string }>;
  /** A push: a connection subscribed to a channel this one is subscribed to (namespaces with join_leave on). */
  join?: WirePresenceEvent;
  /** A push: a connection unsubscribed from such a channel, or closed. */
  leave?: WirePresenceEvent;
  subscribed?: Wire<{
    position: WirePosition;
    recoverable: boolean;
    recovered: boolean;
    publications: WirePublication[];
  }>;
  presence?: Wire<{ channel: string; clients: WireClient[]; missing_workers: string[] }>;
  presence_stats?: Wire<{ channel: string; connections: number; users: number; missing_workers: string[] }>;
  history?: Wire<{ channel: string; publications: WirePublication[]; position: WirePosition; complete: boolean }>;
  /** Answers send: the gateway took the message for the backends. */
  sent?: Wire<Record<string, never>>;
  /** Answers rpc: the backend's answer. */
  rpc?: Wire<{ data: WireContent }>;
}

/** Reads one frame; throws if it is not a JSON object. */
export function parseServerMessage(data: unknown): ServerMessage {
  if (typeof data !== "string") throw new TypeError("herald sent a binary frame; herald.json.v1 frames are text");
  const message: unknown = JSON.parse(data);
  if (typeof message !== "object" || message === null || Array.isArray(message)) {
    throw new TypeError("herald sent a frame that is not a JSON object");
  }
  return message as ServerMessage;
}

export function decodePosition(position: WirePosition): StreamPosition {
  return { offset: position?.offset ?? 0, epoch: position?.epoch ?? "" };
}

export function decodePublication(publication: WirePublication): Publication {
  return {
    channel: publication?.channel ?? "",
    ...decodePayload(publication?.content),
    offset: publication?.offset ?? 0,
    epoch: publication?.epoch ?? "",
  };
}

export function decodeClient(client: WireClient): ClientInfo {
  return {
    workerId: client?.worker_id ?? "",
    connectionId: client?.connection_id ?? "",
    userId: client?.user_id ?? "",
  };
}

export function decodePresenceEvent(event: WirePresenceEvent): PresenceEvent {
  return { channel: event?.channel ?? "", ...decodeClient(event?.info) };
}

export function decodeSubscribed(subscribed: ServerMessage["subscribed"]): SubscribeResult {
  return {
    position: subscribed?.position === undefined ? undefined : decodePosition(subscribed.position),
    recoverable: subscribed?.recoverable ?? false,
    recovered: subscribed?.recovered ?? false,
    publications: (subscribed?.publications ?? []).map(decodePublication),
  };
}

export function decodePresence(presence: ServerMessage["presence"]): PresenceResult {
  return {
    channel: presence?.channel ?? "",
    clients: (presence?.clients ?? []).map(decodeClient),
    missingWorkers: presence?.missing_workers ?? [],
  };
}

export function decodePresenceStats(stats: ServerMessage["presence_stats"]): PresenceStats {
  return {
    channel: stats?.channel ?? "",
    connections: stats?.connections ?? 0,
    users: stats?.users ?? 0,
    missingWorkers: stats?.missing_workers ?? [],
  };
}

export function decodeHistory(history: ServerMessage["history"]): HistoryResult {
  return {
    channel: history?.channel ?? "",
    publications: (history?.publications ?? []).map(decodePublication),
    position: decodePosition(history?.position),
    complete: history?.complete ?? false,
  };
}

/** Options of a history command. */
export interface HistoryOptions {
  /**
   * The most publications returned (at most the namespace's history size).
   * 0, the default, returns the position only.
   */
  readonly limit?: number;
  /** Asks for the publications after this position, oldest first; else the newest ones. */
  readonly since?: StreamPosition;
}

/** WebSocket close codes: the server's, and the ones the client reports itself. */
export const CloseCode = {
  /** The app disconnected. */
  Normal: 1000,
  /** The gateway is shutting down. */
  GoingAway: 1001,
  /** The connection was lost, or never made, without a close frame. */
  Abnormal: 1006,
  /** The client was too slow (its queue overflowed) or stopped answering pings. */
  PolicyViolation: 1008,
  /** The gateway lost its worker id. */
  InternalError: 1011,
  /**
   * Client side: a subscribe or the connect command got no reply in time, so
   * the client gave up on the connection.
   */
  Timeout: 3008,
  /** A backend closed the connection. */
  ClosedByBackend: 4000,
  /** The connection's token expired. */
  TokenExpired: 4001,
  /** The client sent a frame that is not a command (a bug in this library). */
  BadCommand: 4002,
} as const;
