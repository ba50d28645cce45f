/**
 * Payloads: the wire's Content (`{"text": …}` or `{"binary": "<base64>"}`),
 * built from what an app publishes and decoded for what it receives.
 */

import { decodeBase64, encodeBase64 } from "./base64.js";

/** A payload as it travels: text, or bytes in base64. */
export type Content = { readonly text: string } | { readonly binary: string };

/** A received payload: the raw content, and its text or its bytes. */
export interface Payload {
  /** The content as the server sent it. */
  readonly content: Content;
  /** The text, for text content. */
  readonly text?: string;
  /** The bytes, for binary content. */
  readonly data?: Uint8Array;
}

/** What an app publishes: a string is sent as text, bytes as binary. */
export type PublishContent = string | Uint8Array;

/** The wire content for what an app publishes. */
export function encodeContent(value: PublishContent): Content {
  return typeof value === "string" ? { text: value } : { binary: encodeBase64(value) };
}

/** Decodes received content; a missing one is empty text. */
export function decodePayload(content: Partial<{ text: string; binary: string }> | undefined): Payload {
  if (content?.binary !== undefined) {
    return { content: { binary: content.binary }, data: decodeBase64(content.binary) };
  }
  const text = content?.text ?? "";
  return { content: { text }, text };
}
