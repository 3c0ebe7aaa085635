// Undo and redo of every graph edit (Ctrl+Z, Ctrl+Shift+Z, Ctrl+Y). The history is a list of
// snapshots of the workflow text: after each burst of edits the editor calls record(), and a
// snapshot that differs from the last one becomes an undo step. Whatever changes the workflow
// (add, delete, move, connect, widget, paste, groups, modes) is undoable without each edit
// having to describe itself.

const LIMIT = 200;

export class UndoHistory {
  // snapshot(): the workflow as text; restore(text): show that workflow again
  constructor({ snapshot, restore }) {
    this.snapshot = snapshot;
    this.restore = restore;
    this.reset();
  }

  // A new document (opened, imported, new): nothing to undo.
  reset() {
    this.current = this.snapshot();
    this.undoStack = [];
    this.redoStack = [];
  }

  record() {
    const now = this.snapshot();
    if (now === this.current) return false;
    this.undoStack.push(this.current);
    if (this.undoStack.length > LIMIT) this.undoStack.shift();
    this.current = now;
    this.redoStack = [];
    return true;
  }

  // A change the editor made itself (a node grown to show images): part of the current step.
  absorb(before, after) {
    if (this.current === before) this.current = after;
  }

  undo() {
    this.record(); // an edit not yet recorded is the step that is undone
    if (!this.undoStack.length) return false;
    this.redoStack.push(this.current);
    this.current = this.undoStack.pop();
    this.restore(this.current);
    return true;
  }

  redo() {
    if (this.record() || !this.redoStack.length) return false;
    this.undoStack.push(this.current);
    this.current = this.redoStack.pop();
    this.restore(this.current);
    return true;
  }
}
