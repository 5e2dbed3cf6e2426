// LoRA Stack rows: show only the first `rows` rows, with buttons to add and remove rows.
// The `rows` widget is the single source of truth, so a saved workflow, an API-format prompt and a
// node without this script all agree on how many rows are used.
import { app } from "../../scripts/app.js";

const NODE_ID = "MultiLoRAStack";
const ROW_FIELDS = ["lora", "on", "strength_model", "strength_clip", "category", "concept", "trigger"];

function rowOf(widget) {
  const match = /^([a-z_]+)_(\d+)$/.exec(widget.name || "");
  if (!match || !ROW_FIELDS.includes(match[1])) return null;
  return Number(match[2]);
}

// Two renderers draw these widgets. The classic canvas (LiteGraph) lays widgets out by computeSize()
// whether or not they are hidden, so a hidden row gets a zero-height one. Most widgets have no computeSize
// of their own (the layout then uses the default row height): on showing, an own one is put back and a
// borrowed one deleted, or the row keeps zero height and is drawn on top of the next widget.
// The Vue node renderer ("Nodes 2.0", setting Comfy.VueNodes.Enabled) ignores both and leaves out the
// widgets whose options.hidden is set; it reads the options when the node's widget list changes, so
// applyRows() touches that list once it has set them (refreshVueWidgets).
const SAVED = Symbol("multilora.computeSize");

function setHidden(widget, hidden) {
  if (hidden && !(SAVED in widget)) {
    const own = Object.prototype.hasOwnProperty.call(widget, "computeSize");
    widget[SAVED] = { own, computeSize: widget.computeSize };
    widget.computeSize = () => [0, -4];
  } else if (!hidden && SAVED in widget) {
    const saved = widget[SAVED];
    delete widget[SAVED];
    if (saved.own) widget.computeSize = saved.computeSize;
    else delete widget.computeSize;
  }
  widget.hidden = hidden;
  if (widget.options) widget.options.hidden = hidden;
}

// The Vue renderer keeps a reactive copy of node.widgets and re-reads every widget's options when that
// array changes length; taking the last widget off and putting it back is such a change, and a no-op for
// the classic canvas and for serialization. (Frontend 1.49. The experimental Vue renderer of 1.32 stops
// re-reading them after a node's first value change: there a changed row count shows after a reload.)
function refreshVueWidgets(node) {
  const widgets = node.widgets;
  if (!widgets?.length) return;
  const last = widgets.pop();
  widgets.push(last);
}

function applyRows(node) {
  const rowsWidget = node.widgets?.find((w) => w.name === "rows");
  if (!rowsWidget) return;
  const max = rowsWidget.options?.max ?? 10;
  const rows = Math.max(1, Math.min(max, Math.round(rowsWidget.value)));
  for (const widget of node.widgets) {
    const row = rowOf(widget);
    if (row !== null) setHidden(widget, row > rows);
  }
  refreshVueWidgets(node);
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), size[1]]);
  node.setDirtyCanvas(true, true);
}

function changeRows(node, delta) {
  const rowsWidget = node.widgets.find((w) => w.name === "rows");
  const max = rowsWidget.options?.max ?? 10;
  const next = Math.max(1, Math.min(max, rowsWidget.value + delta));
  if (next === rowsWidget.value) return;
  if (delta < 0) {
    // A removed row is reset so that adding it back starts empty.
    for (const widget of node.widgets) {
      if (rowOf(widget) === rowsWidget.value && widget.name.startsWith("lora_")) widget.value = "None";
    }
  }
  rowsWidget.value = next;
  rowsWidget.callback?.(next);
  applyRows(node);
}

app.registerExtension({
  name: "MultiLoRA.stackRows",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_ID) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const rowsWidget = this.widgets.find((w) => w.name === "rows");
      const original = rowsWidget.callback;
      rowsWidget.callback = (value) => {
        original?.call(rowsWidget, value);
        applyRows(this);
      };
      // Buttons go last and are not serialized, so widget indexes of saved workflows never shift
      // (widget.serialize) and the API prompt gets no inputs named after them (options.serialize).
      const add = this.addWidget("button", "+ add LoRA row", null, () => changeRows(this, +1), { serialize: false });
      const remove = this.addWidget("button", "− remove last row", null, () => changeRows(this, -1), { serialize: false });
      add.serialize = false;
      remove.serialize = false;
      applyRows(this);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      applyRows(this);
      return result;
    };
  },
});
