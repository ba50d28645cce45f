/**
 * herald-client: the public API of the JavaScript client for herald's
 * WebSocket client protocol (`herald.json.v1`).
 */

export { HeraldClient } from "./client.js";
export type {
  ClientEvents,
  ConnectionState,
  DisconnectedInfo,
  HeraldClientOptions,
  RpcOptions,
  WebSocketConstructor,
  WebSocketLike,
} from "./client.js";
export type { Content, Payload, PublishContent } from "./content.js";
export { ErrorCode, HeraldError } from "./errors.js";
export { CloseCode, SUBPROTOCOL } from "./protocol.js";
export type {
  ClientInfo,
  ConnectedInfo,
  DirectMessage,
  HistoryOptions,
  HistoryResult,
  PresenceEvent,
  PresenceResult,
  PresenceStats,
  Publication,
  StreamPosition,
} from "./protocol.js";
export type { SubscribedInfo, SubscribeOptions, Subscription, SubscriptionState } from "./subscription.js";
