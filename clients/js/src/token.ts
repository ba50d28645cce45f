/**
 * Tokens: a token and when to replace it, read from a JWT's `exp` (never
 * verified: that is the server's job), and a TokenSource that holds the
 * current token and asks the app's getToken callback for a new one.
 */

import { decodeBase64 } from "./base64.js";

/** Refresh at most this long before expiry... */
const MAX_LEAD_MS = 5_000;
/** ...and at most this share of the token's lifetime before it. */
const LEAD_SHARE = 0.1;

/** A token and, for a JWT with `exp`, when it should be replaced. */
export class Token {
  readonly value: string;
  /** When to get a new token (ms since the epoch); undefined if it never expires. */
  readonly refreshAtMs: number | undefined;

  constructor(value: string, nowMs: number = Date.now()) {
    this.value = value;
    this.refreshAtMs = refreshTime(value, nowMs);
  }

  /** Whether it is time to replace the token. */
  isStale(nowMs: number = Date.now()): boolean {
    return this.refreshAtMs !== undefined && nowMs >= this.refreshAtMs;
  }
}

/** The refresh time of a JWT with `exp`: 10% of its lifetime or 5 s before expiry, whichever is closer. */
function refreshTime(token: string, nowMs: number): number | undefined {
  const claims = jwtClaims(token);
  if (typeof claims?.exp !== "number") return undefined;
  const expiresAtMs = claims.exp * 1000;
  const issuedAtMs = typeof claims.iat === "number" ? claims.iat * 1000 : nowMs;
  const leadMs = Math.min(MAX_LEAD_MS, Math.max(0, expiresAtMs - issuedAtMs) * LEAD_SHARE);
  return expiresAtMs - leadMs;
}

/** The claims of a JWT, or undefined if the token is not one. */
function jwtClaims(token: string): { exp?: unknown; iat?: unknown } | undefined {
  const parts = token.split(".");
  if (parts.length !== 3) return undefined;
  try {
    const claims: unknown = JSON.parse(new TextDecoder().decode(decodeBase64(parts[1] ?? "")));
    return typeof claims === "object" && claims !== null ? claims : undefined;
  } catch {
    return undefined;
  }
}

/** Where a connection's or a subscription's token comes from. */
export class TokenSource {
  readonly #getToken: (() => Promise<string>) | undefined;
  #current: Token | undefined;

  constructor(token: string | undefined, getToken: (() => Promise<string>) | undefined) {
    this.#current = token === undefined ? undefined : new Token(token);
    this.#getToken = getToken;
  }

  /** The token in use, if any. */
  get current(): Token | undefined {
    return this.#current;
  }

  /** Whether a new token can be asked for. */
  get canRefresh(): boolean {
    return this.#getToken !== undefined;
  }

  /** Whether fetch() must run before the token is used: there is none yet, it is stale, or `force`. */
  needsFetch(force: boolean): boolean {
    return this.#getToken !== undefined && (force || this.#current === undefined || this.#current.isStale());
  }

  /** Asks the app for a new token and makes it the current one. */
  async fetch(): Promise<string> {
    if (this.#getToken === undefined) throw new Error("no getToken callback to refresh the token with");
    const value = await this.#getToken();
    if (typeof value !== "string" || value === "") throw new TypeError("getToken must resolve to a non-empty string");
    this.#current = new Token(value);
    return value;
  }
}
