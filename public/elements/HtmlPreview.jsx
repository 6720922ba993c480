// Babl's HTML preview: a Chainlit 2.12 custom element (cl.CustomElement(name="HtmlPreview", props=...)).
//
// The props come from babl_core/render.py:preview_props and are a global `props` (Chainlit runs this
// file with react-runner; only the imports Chainlit lists are available). The generated page is shown
// in an <iframe sandbox srcdoc>: it never runs on the app's origin. This file never injects HTML into
// the app's page, and refuses to render when the sandbox attribute is missing or would let the page
// out (allow-same-origin above all).
//
// Chainlit re-evaluates this file on every props update (each streaming update of the preview), which
// remounts the component: UI state (full screen, height) is therefore kept in a window-level map keyed
// by props.preview_id.
import { useEffect, useRef, useState } from 'react';
import { Button } from '@/components/ui/button';
import { Download, Maximize2, Minimize2, TriangleAlert } from 'lucide-react';

// Keep in step with ALLOWED_SANDBOX_TOKENS in babl_core/render.py.
const ALLOWED_SANDBOX_TOKENS = ['allow-scripts'];
// Never HTML: the Blob URL is on the app's origin, and as text/html the page would run there if opened.
const DOWNLOAD_TYPE = 'application/octet-stream';
const DEFAULT_HEIGHT = 480;
const MIN_HEIGHT = 160;

function sandboxProblem(sandbox) {
  if (typeof sandbox !== 'string') return 'the preview has no sandbox attribute';
  const refused = sandbox
    .split(/\s+/)
    .filter((token) => token && !ALLOWED_SANDBOX_TOKENS.includes(token.toLowerCase()));
  return refused.length ? `sandbox tokens refused: ${refused.join(' ')}` : null;
}

function humanSize(bytes) {
  if (typeof bytes !== 'number') return '';
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / (1024 * 1024)).toFixed(1)} MiB`;
}

const uiState = (window.__bablHtmlPreview = window.__bablHtmlPreview || {});

function remember(key, patch) {
  uiState[key] = { ...(uiState[key] || {}), ...patch };
}

function downloadPage() {
  const blob = new Blob([props.html], { type: DOWNLOAD_TYPE });
  const url = URL.createObjectURL(blob);
  const link = document.createElement('a');
  link.href = url;
  link.download = props.filename || 'preview.html';
  link.rel = 'noopener';
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

export default function HtmlPreview() {
  const key = props.preview_id || props.title || 'preview';
  const saved = uiState[key] || {};
  const [fullScreen, setFullScreen] = useState(Boolean(saved.fullScreen));
  const box = useRef(null);

  const toggleFullScreen = () => {
    remember(key, { fullScreen: !fullScreen });
    setFullScreen(!fullScreen);
  };

  useEffect(() => {
    if (!fullScreen) return undefined;
    const onKey = (event) => {
      if (event.key === 'Escape') {
        remember(key, { fullScreen: false });
        setFullScreen(false);
      }
    };
    window.addEventListener('keydown', onKey);
    return () => window.removeEventListener('keydown', onKey);
  }, [fullScreen, key]);

  // The frame's box is resizable (CSS resize); keep the height the user dragged it to.
  useEffect(() => {
    const element = box.current;
    if (!element || fullScreen || typeof ResizeObserver === 'undefined') return undefined;
    const observer = new ResizeObserver(() => remember(key, { height: element.offsetHeight }));
    observer.observe(element);
    return () => observer.disconnect();
  }, [fullScreen, key]);

  const problem = sandboxProblem(props.sandbox);
  if (problem) {
    return (
      <div className="flex items-center gap-2 rounded-md border p-3 text-sm" data-testid="html-preview-refused">
        <TriangleAlert className="h-4 w-4" />
        <span>HTML preview not shown: {problem}.</span>
      </div>
    );
  }

  const frameStyle = fullScreen
    ? { flex: '1 1 auto', minHeight: 0 }
    : { height: saved.height || DEFAULT_HEIGHT, minHeight: MIN_HEIGHT, resize: 'vertical', overflow: 'hidden' };
  const outerStyle = fullScreen
    ? { position: 'fixed', inset: 0, zIndex: 60, display: 'flex', flexDirection: 'column' }
    : { display: 'flex', flexDirection: 'column', width: '100%' };
  const canDownload = Boolean(props.final && typeof props.html === 'string');

  return (
    <div className="rounded-md border bg-background" style={outerStyle} data-testid="html-preview">
      <div className="flex items-center gap-2 border-b px-3 py-1 text-sm">
        <span className="font-medium truncate" title={props.title}>
          {props.title || 'HTML preview'}
        </span>
        <span className="text-muted-foreground whitespace-nowrap">
          {humanSize(props.bytes)}
          {props.final ? '' : ' · streaming…'}
          {props.truncated ? ' · truncated' : ''}
          {props.scripts ? ' · scripts on' : ''}
        </span>
        <div className="flex-grow" />
        <Button
          variant="ghost"
          size="sm"
          onClick={toggleFullScreen}
          title={fullScreen ? 'Leave full screen (Esc)' : 'Full screen'}
          aria-label={fullScreen ? 'Leave full screen' : 'Full screen'}
        >
          {fullScreen ? <Minimize2 /> : <Maximize2 />}
        </Button>
        <Button
          variant="outline"
          size="sm"
          onClick={downloadPage}
          disabled={!canDownload}
          title={canDownload ? `Download ${props.filename}` : 'Available when the answer is complete'}
        >
          <Download />
          Download .html
        </Button>
      </div>
      <div ref={box} style={frameStyle}>
        <iframe
          title={props.title || 'HTML preview'}
          sandbox={props.sandbox}
          srcDoc={props.srcdoc}
          referrerPolicy="no-referrer"
          style={{ width: '100%', height: '100%', border: 0, background: 'white', display: 'block' }}
        />
      </div>
    </div>
  );
}
