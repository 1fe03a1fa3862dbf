// A model's answer as HTML: Markdown (marked), then sanitized (DOMPurify), then code highlighted
// (highlight.js). The sanitizer is what makes an answer holding <script> or <img onerror> inert; the
// page's Content-Security-Policy (no inline script) is the second wall behind it.

import { marked } from "../vendor/marked/marked.esm.js";
import hljs from "../vendor/highlight/highlight.min.js";

hljs.configure({ ignoreUnescapedHTML: true });

const SANITIZE = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select"],
  FORBID_ATTR: ["style"], // the CSP refuses inline styles anyway; dropping them keeps the console quiet
};

// Links in answers open in a new tab and tell the target nothing.
window.DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

export function renderMarkdown(element, text) {
  element.innerHTML = window.DOMPurify.sanitize(marked.parse(text, { gfm: true, breaks: true }), SANITIZE);
  for (const code of element.querySelectorAll("pre code")) hljs.highlightElement(code);
}

// A structured (JSON-schema mode) answer: an object or array is shown as highlighted JSON; anything
// else (a bare string, text that is not JSON yet because it is still streaming) as Markdown.
export function renderAnswer(element, text, structured) {
  if (structured) {
    let value;
    try {
      value = JSON.parse(text);
    } catch {
      value = undefined;
    }
    if (value !== null && typeof value === "object") {
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      code.className = "language-json";
      code.textContent = JSON.stringify(value, null, 2);
      pre.append(code);
      element.replaceChildren(pre);
      hljs.highlightElement(code);
      return;
    }
  }
  renderMarkdown(element, text);
}
