/**
 * A small typed event emitter for the client's events. A listener that
 * throws does not stop the others: its error goes to the handler the owner
 * gives.
 */

export class Emitter<Events extends object> {
  readonly #listeners = new Map<keyof Events, Set<(value: never) => void>>();
  readonly #onListenerError: (error: unknown, event: keyof Events) => void;

  constructor(onListenerError: (error: unknown, event: keyof Events) => void) {
    this.#onListenerError = onListenerError;
  }

  /** Adds a listener; returns a function that removes it. */
  on<K extends keyof Events>(event: K, listener: (value: Events[K]) => void): () => void {
    let listeners = this.#listeners.get(event);
    if (listeners === undefined) this.#listeners.set(event, (listeners = new Set()));
    listeners.add(listener);
    return () => this.off(event, listener);
  }

  /** Removes a listener. */
  off<K extends keyof Events>(event: K, listener: (value: Events[K]) => void): void {
    this.#listeners.get(event)?.delete(listener);
  }

  /** Whether the event has listeners. */
  has(event: keyof Events): boolean {
    return (this.#listeners.get(event)?.size ?? 0) > 0;
  }

  /** Calls the event's listeners, in the order they were added. */
  emit<K extends keyof Events>(event: K, value: Events[K]): void {
    for (const listener of [...(this.#listeners.get(event) ?? [])] as ((value: Events[K]) => void)[]) {
      try {
        listener(value);
      } catch (error) {
        this.#onListenerError(error, event);
      }
    }
  }
}
