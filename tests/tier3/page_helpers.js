// Read-outs of the ComfyUI frontend's graph for the browser tests, installed as window.multiloraTest.
// Nothing here changes the graph except setWidget (what typing into a widget does); revealWidget and
// centerOn move the view.
//
// Two node renderers: the classic one draws nodes and their widgets on the canvas (LiteGraph; widget
// positions come from the widgets), the Vue one ("Nodes 2.0", setting Comfy.VueNodes.Enabled, in frontends
// 1.32 and 1.49) draws every node as a DOM element [data-node-id] over the canvas, its widgets as the
// children of .lg-node-widgets, each headed by its name (a button by its label). What a node is drawn with
// is read from the page (nodeElement), here only.
(() => {
  const graph = () => window.app.graph;
  const nodeById = (id) => graph().getNodeById(Number(id)) ?? graph().getNodeById(String(id));
  const nodeElement = (id) => document.querySelector(`[data-node-id="${id}"]`);

  function findWidget(node, name) {
    const widget = node.widgets?.find((w) => w.name === name);
    if (!widget) throw new Error(`node ${node.id} (${node.type}) has no widget ${name}`);
    return widget;
  }

  // The rows of a Vue node's widgets, each with the name it shows first (label or button text).
  function vueWidgetRows(element) {
    const grid = element.querySelector(".lg-node-widgets");
    return [...(grid?.children ?? [])].map((row) => ({
      name: (row.innerText ?? "").trim().split("\n")[0].trim(),
      row,
    }));
  }

  function vueWidgetRow(id, name) {
    const found = vueWidgetRows(nodeElement(id)).find((r) => r.name === name);
    if (!found) throw new Error(`node ${id} shows no widget ${name}`);
    return found.row;
  }

  // Page coordinates <-> canvas coordinates: (p + offset) * scale from the canvas element's corner
  // (ds.convertCanvasToOffset is stale in frontend 1.32).
  function canvasToPage([x, y]) {
    const canvas = window.app.canvas;
    const rect = canvas.canvas.getBoundingClientRect();
    const { offset, scale } = canvas.ds;
    return { x: rect.left + (x + offset[0]) * scale, y: rect.top + (y + offset[1]) * scale };
  }

  function pageToCanvas({ x, y }) {
    const canvas = window.app.canvas;
    const rect = canvas.canvas.getBoundingClientRect();
    const { offset, scale } = canvas.ds;
    return [(x - rect.left) / scale - offset[0], (y - rect.top) / scale - offset[1]];
  }

  // Canvas coordinates of the middle of a widget, whichever renderer draws it.
  function widgetCanvasCenter(id, name) {
    const node = nodeById(id);
    if (nodeElement(id)) {
      const box = vueWidgetRow(id, name).getBoundingClientRect();
      return pageToCanvas({ x: box.left + box.width / 2, y: box.top + box.height / 2 });
    }
    const widget = findWidget(node, name);
    const height = widget.computedHeight ?? window.LiteGraph.NODE_WIDGET_HEIGHT;
    return [node.pos[0] + node.size[0] / 2, node.pos[1] + widget.y + height / 2];
  }

  function comboValues(widget) {
    const values = widget.options?.values;
    return typeof values === "function" ? values(widget) : values;
  }

  window.multiloraTest = {
    // Node types of the graph that the frontend has no definition for (what it lists as missing).
    // (node.has_errors is no sign of that: frontend 1.49 also sets it on a node with a missing model file.)
    missingNodeTypes() {
      const missing = graph().nodes
        .filter((n) => !window.LiteGraph.registered_node_types[n.type])
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
      const widget = findWidget(node, name);
      widget.value = value;
      widget.callback?.(value, window.app.canvas, node);
      graph().setDirtyCanvas(true, true);
    },

    // Which renderer draws a node: "vue" (a DOM element) or "classic" (the canvas).
    renderer(id) {
      return nodeElement(id) ? "vue" : "classic";
    },

    // The widgets a node shows, top to bottom, with their vertical extent in canvas units (y from the
    // node's top for the classic canvas, from the canvas origin for Vue nodes: only differences count).
    shownWidgets(id) {
      const element = nodeElement(id);
      if (element) {
        const scale = window.app.canvas.ds.scale;
        return vueWidgetRows(element).map(({ name, row }) => {
          const box = row.getBoundingClientRect();
          return { name, y: box.top / scale, height: box.height / scale };
        });
      }
      return (nodeById(id).widgets ?? []).filter((w) => !w.hidden).map((w) => ({
        name: w.name, y: w.y, height: w.computedHeight,
      }));
    },

    // Moves the view (zoom 1) so a widget is in the middle of the canvas.
    revealWidget(id, name) {
      const point = widgetCanvasCenter(id, name);
      const canvas = window.app.canvas;
      const rect = canvas.canvas.getBoundingClientRect();
      canvas.ds.scale = 1;
      canvas.ds.offset[0] = rect.width / 2 - point[0];
      canvas.ds.offset[1] = rect.height / 2 - point[1];
      canvas.setDirty(true, true);
    },

    // Page coordinates of the middle of a widget as drawn now (a Vue node follows the view a frame later).
    widgetCenter(id, name) {
      if (nodeElement(id)) {
        const box = vueWidgetRow(id, name).getBoundingClientRect();
        return { x: box.left + box.width / 2, y: box.top + box.height / 2 };
      }
      return canvasToPage(widgetCanvasCenter(id, name));
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
