// Read-outs of the ComfyUI frontend's graph for the browser tests, installed as window.multiloraTest.
// Nothing here changes the graph except setWidget (what typing into a widget does).
(() => {
  const graph = () => window.app.graph;
  const nodeById = (id) => graph().getNodeById(Number(id)) ?? graph().getNodeById(String(id));

  function comboValues(widget) {
    const values = widget.options?.values;
    return typeof values === "function" ? values(widget) : values;
  }

  window.multiloraTest = {
    // Node types of the graph that the frontend has no definition for (what it lists as missing).
    missingNodeTypes() {
      const missing = graph().nodes
        .filter((n) => !window.LiteGraph.registered_node_types[n.type] || n.has_errors)
        .map((n) => n.type);
      return [...new Set(missing)].sort();
    },

    // Combo widgets whose value is not one of their options: the server refuses these
    // ("Value not in list") and the frontend draws the node red after queueing.
    invalidWidgets() {
      const invalid = [];
      for (const node of graph().nodes) {
        for (const widget of node.widgets ?? []) {
          if (widget.type !== "combo" || widget.hidden) continue;
          const values = comboValues(widget);
          if (Array.isArray(values) && !values.includes(widget.value)) {
            invalid.push({ node: node.id, type: node.type, widget: widget.name, value: widget.value });
          }
        }
      }
      return invalid;
    },

    // Nodes the frontend marks as failed (validation or execution errors of the last queueing).
    nodeErrors() {
      const errors = window.app.lastNodeErrors ?? {};
      const flagged = graph().nodes.filter((n) => n.has_errors).map((n) => n.id);
      return { lastNodeErrors: errors, flagged };
    },

    nodesOfType(type) {
      return graph().nodes.filter((n) => n.type === type).map((n) => n.id);
    },

    nodeTypes() {
      return graph().nodes.map((n) => n.type);
    },

    widgets(id) {
      return (nodeById(id).widgets ?? []).map((w) => ({
        name: w.name, type: w.type, value: w.value, hidden: !!w.hidden,
        y: w.y, height: w.computedHeight, serialize: w.serialize !== false,
      }));
    },

    setWidget(id, name, value) {
      const node = nodeById(id);
      const widget = node.widgets.find((w) => w.name === name);
      if (!widget) throw new Error(`node ${id} (${node.type}) has no widget ${name}`);
      widget.value = value;
      widget.callback?.(value, window.app.canvas, node);
      graph().setDirtyCanvas(true, true);
    },

    // Moves the view so a widget is in the middle of the canvas at zoom 1; returns its page coordinates.
    widgetCenter(id, name) {
      const node = nodeById(id);
      const widget = node.widgets.find((w) => w.name === name);
      if (!widget) throw new Error(`node ${id} (${node.type}) has no widget ${name}`);
      const canvas = window.app.canvas;
      const rect = canvas.canvas.getBoundingClientRect();
      const height = widget.computedHeight ?? window.LiteGraph.NODE_WIDGET_HEIGHT;
      const point = [node.pos[0] + node.size[0] / 2, node.pos[1] + widget.y + height / 2];
      canvas.ds.scale = 1;
      canvas.ds.offset[0] = rect.width / 2 - point[0];
      canvas.ds.offset[1] = rect.height / 2 - point[1];
      canvas.setDirty(true, true);
      // Canvas to page coordinates: (p + offset) * scale (ds.convertCanvasToOffset is stale in this frontend).
      const { offset, scale } = canvas.ds;
      return { x: rect.left + (point[0] + offset[0]) * scale, y: rect.top + (point[1] + offset[1]) * scale };
    },

    centerOn(id) {
      const node = nodeById(id);
      window.app.canvas.ds.scale = 1;
      window.app.canvas.centerOnNode(node);
      graph().setDirtyCanvas(true, true);
    },

    // Images an output node shows (set on the node when the server reports its 'executed' output).
    shownImages(id) {
      const node = nodeById(id);
      return (node.imgs ?? []).map((img) => ({
        src: img.src, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
      }));
    },
  };
})();
