/**
 * A subscription's place in its channel's stream: the position of the last
 * publication handed to the app (or the one the subscribe reply gave, before
 * any), where to recover from after a reconnect, and which publications are
 * duplicates to drop.
 */

import type { StreamPosition } from "./protocol.js";

export class StreamCursor {
  #position: StreamPosition | undefined;
  #recoverable = false;

  /** The last position handed to the app, if the channel has history. */
  get position(): StreamPosition | undefined {
    return this.#position;
  }

  /** Where a resubscribe recovers from; undefined when the channel cannot recover. */
  recoverFrom(): StreamPosition | undefined {
    return this.#recoverable ? (this.#position ?? { offset: 0, epoch: "" }) : undefined;
  }

  /**
   * Takes a publication: true to hand it to the app (and remember it), false
   * for one at or before the remembered position of the same epoch.
   * Publications without an epoch (no history) are always handed on.
   */
  admit(publication: StreamPosition): boolean {
    if (publication.epoch === "") return true;
    const last = this.#position;
    if (last !== undefined && last.epoch === publication.epoch && publication.offset <= last.offset) return false;
    this.#position = { offset: publication.offset, epoch: publication.epoch };
    return true;
  }

  /**
   * Records a subscribe reply, once the publications it recovered were
   * admitted: whether the channel can recover, and its position, taken when
   * it is ahead of the remembered one or of another epoch.
   */
  subscribed(recoverable: boolean, position: StreamPosition | undefined): void {
    this.#recoverable = recoverable;
    const last = this.#position;
    if (
      position !== undefined &&
      (last === undefined || last.epoch !== position.epoch || last.offset < position.offset)
    ) {
      this.#position = position;
    }
  }
}
