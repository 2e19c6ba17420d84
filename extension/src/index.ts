/**
 * heart-onnx JupyterLab front end.
 *
 * - An `.onnx` viewer: double-clicking a model in the file browser opens a panel with the summary
 *   `heart-onnx inspect` gives (parameters, FLOPs, attention blocks, the stored plan), fetched from
 *   the heart-onnx server extension (`GET /heart-onnx/inspect?path=...`), so the model is parsed
 *   by Python, never shipped to the browser.
 * - "Open budget tuner" (file browser context menu, command palette, and a button in the viewer):
 *   asks the server to write a tuning notebook next to the model (`POST /heart-onnx/tuner`) and opens it.
 */
import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { URLExt } from '@jupyterlab/coreutils';
import { ABCWidgetFactory, DocumentRegistry, DocumentWidget, IDocumentWidget } from '@jupyterlab/docregistry';
import { IDefaultFileBrowser } from '@jupyterlab/filebrowser';
import { ServerConnection } from '@jupyterlab/services';
import { Widget } from '@lumino/widgets';

const FACTORY = 'heart-onnx viewer';
const OPEN_TUNER = 'heart-onnx:open-tuner';

/** Call a heart-onnx server endpoint; throws an Error carrying the server's message on 4xx/5xx. */
async function requestAPI<T>(endpoint: string, init: RequestInit = {}): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'heart-onnx', endpoint);
  const response = await ServerConnection.makeRequest(url, init, settings);
  const text = await response.text();
  let data: any = {};
  try {
    data = text ? JSON.parse(text) : {};
  } catch {
    data = { message: text };
  }
  if (!response.ok) {
    throw new Error(data.message || data.reason || `HTTP ${response.status}`);
  }
  return data as T;
}

interface IAttention {
  layer: number;
  heads: number;
  head_dim: number;
  seq_len: number | null;
}

interface ISummary {
  path: string;
  opset: number;
  producer: string;
  exporter: string;
  params: number;
  flops: { total: number; by_op: { [op: string]: number } } | number;
  inputs: { name: string; dtype: string; shape: (number | string | null)[] }[];
  outputs: { name: string; dtype: string; shape: (number | string | null)[] }[];
  attention: IAttention[];
  plan: any;
}

function human(n: number): string {
  const units = ['', 'K', 'M', 'G', 'T'];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) {
    n /= 1000;
    i++;
  }
  return `${n.toFixed(n >= 100 || i === 0 ? 0 : 2)}${units[i]}`;
}

function el(tag: string, attrs: { [k: string]: string } = {}, text?: string): HTMLElement {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    node.setAttribute(k, v);
  }
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

function table(header: string[], rows: (string | number)[][]): HTMLElement {
  const t = el('table');
  const tr = el('tr');
  header.forEach(h => tr.appendChild(el('th', {}, h)));
  t.appendChild(tr);
  for (const row of rows) {
    const r = el('tr');
    row.forEach((c, i) => r.appendChild(el('td', i === 0 ? { class: 'jp-HeartOnnx-key' } : {}, String(c))));
    t.appendChild(r);
  }
  return t;
}

/** The body of the viewer: renders the inspect summary of one `.onnx` file. */
export class OnnxViewer extends Widget {
  constructor(private _path: string, private _commands: JupyterFrontEnd['commands']) {
    super();
    this.addClass('jp-HeartOnnxViewer');
    void this.refresh();
  }

  get path(): string {
    return this._path;
  }

  async refresh(): Promise<void> {
    this.node.textContent = 'Inspecting…';
    try {
      const s = await requestAPI<ISummary>(`inspect?path=${encodeURIComponent(this._path)}`);
      this.render(s);
    } catch (err) {
      this.node.textContent = '';
      this.node.appendChild(el('div', { class: 'jp-HeartOnnx-error' }, `Cannot inspect ${this._path}: ${(err as Error).message}`));
    }
  }

  private render(s: ISummary): void {
    const node = this.node;
    node.textContent = '';
    node.appendChild(el('h2', {}, this._path));
    const totalFlops = typeof s.flops === 'number' ? s.flops : s.flops.total;
    const heads = s.attention.reduce((acc, a) => acc + a.heads, 0);
    const summary = table(
      ['', ''],
      [
        ['parameters', human(s.params)],
        ['FLOPs (batch 1)', human(totalFlops)],
        ['attention blocks', s.attention.length],
        ['heads (total)', heads],
        ['opset', s.opset],
        ['exporter', s.exporter],
        ['producer', s.producer]
      ]
    );
    summary.setAttribute('data-heart-onnx', 'summary');
    node.appendChild(summary);

    const button = el('button', { class: 'jp-mod-styled jp-mod-accept', 'data-heart-onnx': 'open-tuner' }, 'Open budget tuner');
    button.onclick = () => void this._commands.execute(OPEN_TUNER, { path: this._path });
    node.appendChild(button);

    node.appendChild(el('h3', {}, 'Inputs and outputs'));
    const io = [...s.inputs.map(i => ['in: ' + i.name, i.dtype, JSON.stringify(i.shape)]), ...s.outputs.map(o => ['out: ' + o.name, o.dtype, JSON.stringify(o.shape)])];
    node.appendChild(table(['tensor', 'dtype', 'shape'], io));

    node.appendChild(el('h3', {}, 'Attention blocks'));
    if (s.attention.length) {
      const att = table(['layer', 'heads', 'head size', 'tokens'], s.attention.map(a => [a.layer, a.heads, a.head_dim, a.seq_len ?? 'dynamic']));
      att.setAttribute('data-heart-onnx', 'attention');
      node.appendChild(att);
    } else {
      node.appendChild(el('p', {}, 'No attention blocks (a CNN, or a pattern heart-onnx does not recognise).'));
    }

    if (typeof s.flops !== 'number' && s.flops.by_op) {
      node.appendChild(el('h3', {}, 'FLOPs by operator'));
      const rows = Object.entries(s.flops.by_op)
        .sort((a, b) => b[1] - a[1])
        .map(([op, f]) => [op, human(f)]);
      node.appendChild(table(['op', 'FLOPs'], rows));
    }

    node.appendChild(el('h3', {}, 'Pruning plan stored in the model'));
    if (s.plan) {
      node.appendChild(el('pre', { 'data-heart-onnx': 'plan' }, JSON.stringify(s.plan, null, 1)));
    } else {
      node.appendChild(el('p', {}, 'None: this model has not been pruned by heart-onnx.'));
    }
  }
}

class OnnxViewerFactory extends ABCWidgetFactory<IDocumentWidget<OnnxViewer>> {
  constructor(options: DocumentRegistry.IWidgetFactoryOptions, private _commands: JupyterFrontEnd['commands']) {
    super(options);
  }

  protected createNewWidget(context: DocumentRegistry.Context): IDocumentWidget<OnnxViewer> {
    const content = new OnnxViewer(context.path, this._commands);
    const widget = new DocumentWidget({ content, context });
    widget.title.label = context.path.split('/').pop() || context.path;
    return widget;
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'heart-onnx:plugin',
  description: 'An .onnx viewer and a budget-tuner command for heart-onnx.',
  autoStart: true,
  optional: [ICommandPalette, IDefaultFileBrowser],
  activate: (app: JupyterFrontEnd, palette: ICommandPalette | null, browser: IDefaultFileBrowser | null) => {
    app.docRegistry.addFileType({
      name: 'onnx',
      displayName: 'ONNX model',
      extensions: ['.onnx'],
      mimeTypes: ['application/octet-stream'],
      contentType: 'file',
      fileFormat: 'base64'
    });
    const factory = new OnnxViewerFactory(
      { name: FACTORY, modelName: 'base64', fileTypes: ['onnx'], defaultFor: ['onnx'], readOnly: true },
      app.commands
    );
    app.docRegistry.addWidgetFactory(factory);

    app.commands.addCommand(OPEN_TUNER, {
      label: 'Open budget tuner',
      caption: 'Create a heart-onnx budget-tuning notebook for this model and open it',
      execute: async args => {
        let path = (args.path as string) || '';
        if (!path && browser) {
          const item = browser.selectedItems().next();
          if (item && !item.done && item.value.path.endsWith('.onnx')) {
            path = item.value.path;
          }
        }
        const body = JSON.stringify({ path });
        const reply = await requestAPI<{ path: string }>('tuner', { method: 'POST', body });
        return app.commands.execute('docmanager:open', { path: reply.path });
      }
    });
    app.contextMenu.addItem({ command: OPEN_TUNER, selector: '.jp-DirListing-item[data-file-type="onnx"]', rank: 10 });
    if (palette) {
      palette.addItem({ command: OPEN_TUNER, category: 'heart-onnx' });
    }
  }
};

export default plugin;
